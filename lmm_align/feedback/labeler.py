"""RLAIF-V's "conquer" step: a labeler answers each yes/no question with one forward pass.

Published RLAIF-V generates one token with the labeler and keeps the softmax of that first
step's logits at the "yes"/"Yes"/"no"/"No" ids. That distribution is the next-token
distribution at the last prompt position, so one forward pass over the prompt gives it: no KV
cache, no decode loop. For a question q the labeler reads

  p = softmax(logits[last real prompt position])          float32 over the vocabulary
  p_yes = sum_{w in yes_words} p[id(w)],  p_no = sum_{w in no_words} p[id(w)]

and a claim is rejected iff p_no >= p_yes (RLAIF-V's `pair_construction`: supported iff
p_yes > p_no). The prompt is the question (plus an optional suffix, e.g. LLaVA's short-answer
instruction) as the user turn with the image, ending in the template's generation prompt
("... ASSISTANT:"), exactly what the sampler would be given.

Which ids: our conversation encoding puts the space after "ASSISTANT:" into the answer's
first token (`conversation.py`), so the token the model emits first for the answer "Yes" is
the single token of `tokenizer.encode(" Yes")`. `answer_token_ids` encodes prefix + word
(prefix " " by default) without special tokens and requires exactly one token per word;
otherwise it raises, naming the word and its tokens: summing the probability of a first
piece ("y" of "y"+"es") would count every answer that starts with that piece. A tokenizer
with only some single-token spellings (the shapes world's has " Yes"/" No" but not " yes")
is used by passing just those words.

Batching: questions are sorted by prompt length, cut into batches of `batch_size` (a short
last batch is filled with copies of its last row), and each batch is padded (right by
default, or left) to a length bucket; the score of a row is read at its last real position,
gathered on device from the hidden states before the LM head, so only [B, D] hidden states
meet the vocabulary matrix. The forward is jitted at module level with the config static: one
compilation per (bucket, batch size). Each row carries its image in a row-aligned slot
[B, 1, H, W, 3] (zeros and no placeholders for a question without an image).

Model-sharded (`mesh=`, a labeler too large for one device: RLAIF-V's LLaVA-NeXT-34B): the
params stay as loaded (sharded by the logical rules, `inference.load_model_folder(mesh=...)`),
each batch's rows are split over the mesh's data x fsdp axes, the forward is traced under the
rules (activations sharded as in training) and p_yes / p_no come back replicated.

Shape letters: B batch, T bucket length, D model width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lmm_align import sampling, sharding
from lmm_align.data import conversation
from lmm_align.data.anyres import AnyresImageConfig, preprocess_anyres_image
from lmm_align.data.images import ImageProcessorConfig, preprocess_image
from lmm_align.models import anyres
from lmm_align.models.config import ModelConfig
from lmm_align.models.llava import Llava

Array = jax.Array

DEFAULT_YES_WORDS = ("yes", "Yes")
DEFAULT_NO_WORDS = ("no", "No")


# --------------------------------------------------------------------------------------------
# Answer token ids.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AnswerTokens:
  """The vocabulary ids whose probabilities make up p_yes and p_no."""

  yes_ids: tuple[int, ...]
  no_ids: tuple[int, ...]


def answer_token_ids(
  tokenizer: Any,
  yes_words: Sequence[str] = DEFAULT_YES_WORDS,
  no_words: Sequence[str] = DEFAULT_NO_WORDS,
  prefix: str = " ",
) -> AnswerTokens:
  """The id of `prefix + word` for every word; each must encode to exactly one token.

  prefix: what precedes the word in an answer as the conversation encoding tokenizes it
  (" ": the answer piece carries its leading space). Raises ValueError naming the word and
  its tokens if a word is not one token, or if a yes and a no word share an id.
  """
  ids = {}
  for word in (*yes_words, *no_words):
    pieces = tokenizer.encode(prefix + word, add_special_tokens=False, split_special_tokens=True)
    if len(pieces) != 1:
      raise ValueError(
        f"answer word {prefix + word!r} is {len(pieces)} tokens "
        f"{tokenizer.convert_ids_to_tokens(pieces)} in this tokenizer, not one; pass only "
        f"words that are single tokens (yes_words/no_words) or another prefix"
      )
    ids[word] = int(pieces[0])
  yes_ids = tuple(dict.fromkeys(ids[w] for w in yes_words))
  no_ids = tuple(dict.fromkeys(ids[w] for w in no_words))
  if not yes_ids or not no_ids:
    raise ValueError("need at least one yes word and one no word")
  if set(yes_ids) & set(no_ids):
    raise ValueError(f"yes words {list(yes_words)} and no words {list(no_words)} share an id")
  return AnswerTokens(yes_ids, no_ids)


# --------------------------------------------------------------------------------------------
# The jitted forward.
# --------------------------------------------------------------------------------------------


def _lm_logits(module: Llava, hidden: Array) -> Array:
  """Final hidden states [B, D] -> float32 logits [B, V] (for `apply(method=...)`)."""
  lm = module.language_model
  if lm.config.tie_word_embeddings:
    return lm.embed_tokens.attend(hidden).astype(jnp.float32)
  return lm.lm_head(hidden).astype(jnp.float32)


def yes_no_probabilities(logits: Array, yes_ids: Array, no_ids: Array) -> tuple[Array, Array]:
  """logits float32[B, V] -> (p_yes, p_no) float32[B]: softmax mass on each id set."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.sum(probs[:, yes_ids], axis=-1), jnp.sum(probs[:, no_ids], axis=-1)


def last_position_yes_no(
  params: dict,
  input_ids: Array,
  attention_mask: Array,
  pixel_values: Array | None,
  last_index: Array,
  yes_ids: Array,
  no_ids: Array,
  pack_plan: dict | None = None,
  *,
  config: ModelConfig,
) -> tuple[Array, Array]:
  """(p_yes, p_no) float32[B] of the next token after each row's last real prompt token.

  input_ids, attention_mask: int32[B, T], padded on either side. pixel_values: float32
  [B, I, H, W, 3] row-aligned image slots, or (LLaVA-NeXT / OneVision) each row's tiles
  [B, tiles, H, W, 3] with their `anyres.pack_plan(...).as_arrays()`; or None. last_index:
  int32[B], each row's last real position. yes_ids, no_ids: int32 id lists.
  """
  model = Llava(config)
  variables = {"params": params}
  out = model.apply(
    variables, input_ids, pixel_values, attention_mask, with_logits=False, pack_plan=pack_plan
  )
  hidden = jnp.take_along_axis(out.hidden_states, last_index[:, None, None], axis=1)[:, 0]
  logits = model.apply(variables, hidden, method=_lm_logits)
  return yes_no_probabilities(logits, yes_ids, no_ids)


jit_last_position_yes_no = jax.jit(last_position_yes_no, static_argnames=("config",))


@functools.cache
def _mesh_last_position_yes_no(mesh: Mesh) -> Callable[..., tuple[Array, Array]]:
  """`last_position_yes_no` jitted for params and rows sharded over `mesh`; its (p_yes, p_no)
  replicated, so every process can read them."""
  return jax.jit(
    last_position_yes_no, static_argnames=("config",), out_shardings=sharding.replicated(mesh)
  )


# --------------------------------------------------------------------------------------------
# Host side.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class YesNoScores:
  """p_yes, p_no: float32[Q], one per question, in the order asked."""

  p_yes: np.ndarray
  p_no: np.ndarray

  @property
  def rejected(self) -> np.ndarray:
    """bool[Q]: the labeler does not support the claim (p_no >= p_yes)."""
    return self.p_no >= self.p_yes


def pad_rows(
  prompts: Sequence[Sequence[int]], length: int, pad_id: int, side: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Token lists -> (input_ids, attention_mask, last_index), padded on `side` to `length`."""
  if side == "left":
    ids, mask = sampling.left_pad(prompts, length, pad_id)
    return ids, mask, np.full((len(prompts),), length - 1, np.int32)
  if side != "right":
    raise ValueError(f"padding side {side!r}: use 'left' or 'right'")
  ids = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for row, prompt in enumerate(prompts):
    ids[row, : len(prompt)], mask[row, : len(prompt)] = prompt, 1
  return ids, mask, np.asarray([len(p) - 1 for p in prompts], np.int32)


class YesNoLabeler:
  """Answers yes/no questions about images with any Llava: p_yes, p_no per question.

  The labeler may be a separate model or the policy itself (self-alignment: pass the
  policy's params). `template` must be the one the labeler was trained with.
  mesh: the mesh the params are sharded over (None: one device); each batch's rows are split
  over its data x fsdp axes, so batch_size must be a multiple of their size. rules: the
  logical axis rules the forward's activations follow on it.
  """

  def __init__(
    self,
    model_or_config: Llava | ModelConfig,
    params: dict,
    tokenizer: Any,
    image_config: ImageProcessorConfig | AnyresImageConfig | None,
    *,
    template: str,
    batch_size: int = 16,
    answer_tokens: AnswerTokens | None = None,
    question_suffix: str = "",
    padding_side: str = "right",
    buckets: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES,
  ):
    config = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1")
    if mesh is not None and batch_size % sharding.data_parallel_size(mesh):
      raise ValueError(
        f"batch_size={batch_size} must be a multiple of the mesh's data x fsdp size "
        f"{sharding.data_parallel_size(mesh)}: each batch's rows are split over them"
      )
    if config.has_vision and image_config is None:
      raise ValueError("a labeler with a vision tower needs an image_config")
    if padding_side not in ("left", "right"):
      raise ValueError(f"padding_side {padding_side!r}: use 'left' or 'right'")
    self.config, self.params, self.tokenizer = config, params, tokenizer
    self.image_config, self.template = image_config, conversation.get_template(template)
    self.batch_size, self.question_suffix = batch_size, question_suffix
    self.padding_side, self.buckets = padding_side, buckets
    self.mesh, self.rules = mesh, tuple(tuple(rule) for rule in rules)
    self.answer_tokens = answer_tokens or answer_token_ids(tokenizer)
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # LLaVA-NeXT / OneVision (RLAIF-V's NeXT-34B labeler): each image as its anyres tiles, every
    # batch carrying the processor's largest tile count (one compiled shape per length bucket).
    self.tiled = isinstance(image_config, AnyresImageConfig)
    if self.tiled and not config.anyres:
      raise ValueError("an anyres image_config needs an anyres model (image_grid_pinpoints)")
    self._preprocessed: dict[int, Any] = {}

  def encode(self, question: str, with_image: bool, image_tokens: int | None = None) -> list[int]:
    """The prompt ids of one question: user turn (+ image: `image_tokens` placeholders, by
    default the model's per-image count), then the generation prompt."""
    c = self.config
    with_image = with_image and c.has_vision
    return conversation.encode_generation_prompt(
        question + self.question_suffix, self.tokenizer, self.template,
        image_tokens or max(1, c.num_image_tokens), c.image_token_id, with_image=with_image,
        num_images=int(with_image),
    ).input_ids.tolist()  # fmt: skip

  def _preprocess(self, image: Any) -> Any:
    """An image's pixels (tiled: (tiles, (height, width))), once per distinct image object."""
    if id(image) not in self._preprocessed:
      if self.tiled:
        self._preprocessed[id(image)] = preprocess_anyres_image(image, self.image_config)
      else:
        self._preprocessed[id(image)] = preprocess_image(image, self.image_config)
    return self._preprocessed[id(image)]

  def _pixels(self, images: Sequence[Any]) -> tuple[np.ndarray | None, dict | None]:
    """Row-aligned float32[B, 1, H, W, 3] (tiled: [B, tiles, H, W, 3] and their pack plan)."""
    if not self.config.has_vision:
      return None, None
    if self.tiled:
      tiles, side = self.image_config.max_tiles_per_image(), self.image_config.tile_size
      out = np.zeros((len(images), tiles, side, side, 3), np.float32)
      sizes: list[tuple[int, int] | None] = []
      for row, image in enumerate(images):
        sizes.append(None)
        if image is not None:
          pixels, sizes[row] = self._preprocess(image)
          out[row, : len(pixels)] = pixels
      counts = [0 if s is None else self.config.image_tokens(s) for s in sizes]
      budget = sampling.bucket_length(max(max(counts), 1), self.buckets)
      return out, anyres.pack_plan(sizes, self.config.packing, max_tokens=budget).as_arrays()
    h, w = self.image_config.crop_size  # normalised to (height, width) by the config
    out = np.zeros((len(images), 1, h, w, 3), np.float32)
    for row, image in enumerate(images):
      if image is not None:
        out[row, 0] = self._preprocess(image)
    return out, None

  def _score_batch(self, prompts: list[list[int]], images: list[Any]) -> tuple[np.ndarray, ...]:
    fill = self.batch_size - len(prompts)
    prompts, images = prompts + [prompts[-1]] * fill, images + [images[-1]] * fill
    length = sampling.bucket_length(max(map(len, prompts)), self.buckets)
    ids, mask, last = pad_rows(prompts, length, self.pad_id, self.padding_side)
    pixels, plan = self._pixels(images)
    yes_ids = np.asarray(self.answer_tokens.yes_ids, np.int32)
    no_ids = np.asarray(self.answer_tokens.no_ids, np.int32)
    if self.mesh is None:
      p_yes, p_no = jit_last_position_yes_no(
          self.params, jnp.asarray(ids), jnp.asarray(mask),
          None if pixels is None else jnp.asarray(pixels), jnp.asarray(last),
          jnp.asarray(yes_ids), jnp.asarray(no_ids), plan, config=self.config,
      )  # fmt: skip
    else:
      rows = lambda x: (
        None if x is None else sharding.from_host(x, sharding.batch_sharding(self.mesh, x.ndim))
      )
      same = lambda x: sharding.from_host(x, sharding.replicated(self.mesh))
      with sharding.activation_sharding(self.mesh, self.rules):
        p_yes, p_no = _mesh_last_position_yes_no(self.mesh)(
            self.params, rows(ids), rows(mask), rows(pixels), rows(last), same(yes_ids),
            same(no_ids), None if plan is None else {k: rows(v) for k, v in plan.items()},
            config=self.config,
        )  # fmt: skip
    keep = self.batch_size - fill
    return np.asarray(p_yes)[:keep], np.asarray(p_no)[:keep]

  def score(self, questions: Sequence[str], images: Sequence[Any]) -> YesNoScores:
    """p_yes, p_no for each question, asked about the image beside it.

    images: one per question, a PIL image or uint8 array, or None (asked without an image);
    pass the same object for questions about one image so it is preprocessed once.
    """
    if len(questions) != len(images):
      raise ValueError(f"{len(questions)} questions but {len(images)} images")
    if not self.config.has_vision and any(im is not None for im in images):
      raise ValueError("images given to a labeler without a vision tower")
    self._preprocessed = {}  # ids of this call's images (a freed object's id may be reused)
    prompts = []
    for q, im in zip(questions, images, strict=True):
      tokens = None
      if im is not None and self.tiled:
        tokens = self.config.image_tokens(self._preprocess(im)[1])
      prompts.append(self.encode(q, im is not None, tokens))
    # Similar lengths share a batch, so padding (and the number of buckets) stays small.
    order = np.argsort([len(p) for p in prompts], kind="stable")
    p_yes = np.zeros((len(prompts),), np.float32)
    p_no = np.zeros((len(prompts),), np.float32)
    for start in range(0, len(order), self.batch_size):
      rows = order[start : start + self.batch_size]
      p_yes[rows], p_no[rows] = self._score_batch(
        [prompts[i] for i in rows], [images[i] for i in rows]
      )
    self._preprocessed = {}
    return YesNoScores(p_yes, p_no)
