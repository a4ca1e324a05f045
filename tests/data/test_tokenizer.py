"""Locally trained byte-level BPE tokenizers: special ids, determinism, save/load round trip."""

import json
import pathlib
import subprocess
import sys

import pytest
import transformers

from lmm_align.data import tokenizer as tokenizer_lib

CORPUS = [
  f"USER: Is there a {colour} {shape} {where} the {other}? ASSISTANT: Yes, it is {where}."
  for colour in ("red", "green", "blue")
  for shape in ("circle", "square", "triangle")
  for where in ("left of", "above")
  for other in ("star", "cross")
]
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
TEXTS = ["Is there a red circle?", "naïve café — 東京 🙂", "  two  spaces\nand a newline\t"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("tok")
  return tokenizer_lib.train_bpe_tokenizer(CORPUS, vocab_size=320, out_dir=out_dir), out_dir


def test_special_tokens_have_fixed_ids(tok):
  tok, _ = tok
  assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<pad>", "<image>"]) == [0, 1, 2, 3, 4]
  assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
  assert (tok.image_token, tok.image_token_id) == ("<image>", 4)
  assert len(tok) == 320
  assert tok.encode("a<image>b", add_special_tokens=False)[1] == 4


def test_bos_added_like_llama_and_bytes_round_trip(tok):
  tok, _ = tok
  for text in TEXTS:
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert ids[1:] == tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == text  # byte-level: nothing is lost
    assert tok.unk_token_id not in ids


def test_save_and_load_round_trip(tok):
  tok, out_dir = tok
  assert (out_dir / "tokenizer.json").is_file()
  config = json.loads((out_dir / "tokenizer_config.json").read_text())
  assert config["image_token"] == "<image>"
  loaded = tokenizer_lib.load_tokenizer(out_dir)
  assert loaded.image_token_id == 4 and loaded.pad_token_id == 3
  for text in TEXTS + CORPUS[:3]:
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
  batch = loaded(TEXTS, padding=True)["input_ids"]
  assert len({len(row) for row in batch}) == 1 and 3 in batch[0]


def test_training_is_deterministic_across_processes(tok, tmp_path):
  tok, _ = tok
  # Rust's HashMap seeds differ per process, so a second process is the real check.
  script = (
    "import sys; from lmm_align.data.tokenizer import train_bpe_tokenizer as t; "
    f"t({CORPUS!r}, 320, out_dir=sys.argv[1])"
  )
  subprocess.run(
    [sys.executable, "-c", script, str(tmp_path)], check=True, timeout=60, cwd=REPO_ROOT
  )
  other = json.loads((tmp_path / "tokenizer.json").read_text())
  ours = json.loads(tok.backend_tokenizer.to_str())
  assert other["model"]["vocab"] == ours["model"]["vocab"]
  assert other["model"]["merges"] == ours["model"]["merges"]


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="vocab_size=100"):
    tokenizer_lib.train_bpe_tokenizer(CORPUS, vocab_size=100)
  with pytest.raises(ValueError, match="no training text"):
    tokenizer_lib.train_bpe_tokenizer([], vocab_size=300)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tokenizer_lib.load_tokenizer(tmp_path / "missing")
  # A hub-style id is not a local folder: refused before any network lookup.
  with pytest.raises(FileNotFoundError):
    tokenizer_lib.load_tokenizer("openai/clip-vit-large-patch14-336")


def test_class_is_a_fast_tokenizer(tok):
  tok, _ = tok
  assert isinstance(tok, transformers.PreTrainedTokenizerFast)
