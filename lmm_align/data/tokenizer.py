"""Small byte-level BPE tokenizers trained locally, and loading tokenizers from local folders.

Real LLaVA checkpoints use the Llama sentencepiece tokenizer, which cannot be fetched here;
tests and the synthetic shapes world train their own with `train_bpe_tokenizer`. Its special
tokens sit at fixed ids so that configs can name them:

  0 <unk>   1 <s> (bos)   2 </s> (eos)   3 <pad>   4 <image>

Like Llama's tokenizer it prepends <s> when called with `add_special_tokens=True` (the
default), and never appends </s>. `encode_conversation` passes `add_special_tokens=False` and
places BOS/EOS itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN = SPECIAL_TOKENS
# The byte alphabet is always in the vocabulary, so nothing is ever <unk>.
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())


def train_bpe_tokenizer(
  texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike | None = None
) -> transformers.PreTrainedTokenizerFast:
  """Trains a byte-level BPE tokenizer; the same texts in the same order give the same vocab.

  Args:
    texts: training corpus (any iterable of strings; read once).
    vocab_size: final vocabulary size, at least MIN_VOCAB_SIZE (261); training stops earlier
      when the corpus has no pairs left to merge.
    out_dir: if given, the tokenizer is `save_pretrained` there (created if needed).

  Returns:
    A fast tokenizer (transformers 5 class `TokenizersBackend`) with bos/eos/pad/unk set and
    `image_token` / `image_token_id` = "<image>" / 4.
  """
  if vocab_size < MIN_VOCAB_SIZE:
    raise ValueError(f"vocab_size={vocab_size} is below {MIN_VOCAB_SIZE} (specials + 256 bytes)")
  texts = list(texts)
  if not any(texts):
    raise ValueError("no training text: texts is empty or all strings are empty")

  tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
  # No prefix space: " cat" and "cat" stay different, so a piece tokenized alone keeps the
  # tokens it has in running text when the piece carries its own leading space.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(SPECIAL_TOKENS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
  bos_id = tok.token_to_id(BOS_TOKEN)
  tok.post_processor = processors.TemplateProcessing(
    single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
  )

  hf_tok = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token=BOS_TOKEN,
    eos_token=EOS_TOKEN,
    pad_token=PAD_TOKEN,
    unk_token=UNK_TOKEN,
    extra_special_tokens={"image_token": IMAGE_TOKEN},
  )
  if out_dir is not None:
    os.makedirs(out_dir, exist_ok=True)
    hf_tok.save_pretrained(os.fspath(out_dir))
  return hf_tok


def load_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
  """`AutoTokenizer.from_pretrained` on a local folder only: no hub lookup, no remote code."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer folder {path!r} does not exist (only local folders load)")
  return transformers.AutoTokenizer.from_pretrained(
    path, local_files_only=True, trust_remote_code=False
  )
