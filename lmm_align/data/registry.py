"""Data sources by record kind: every trainer of a kind reads every source of that kind.

  records, skipped = registry.read("pairs", config.data)                    # RM and DPO
  records, skipped = registry.read("prompts", config.data, yes_no_fraction=0.5)  # PPO, loop
  examples, skipped = registry.read("conversations", config.data, encoding=encoding)  # SFT

Kinds and what their readers return (records in file order, plus a Counter of the records
refused with data.on_error="skip", by `skipped_<reason>`):

  conversations  encoded `pipeline.Example`s; the reader gets `encoding=ConversationEncoding`
                 (tokenizer, template, P, image token id). Sources here: llava_json, tfds,
                 llava_critic_parquet.
  pairs          {"id", "image", "question", "history", "chosen", "rejected", "facts", ...}
                 (`preference_sources`), optionally "ref_logps" / "ref_avg_logps" [2] (cached
                 reference log-probs). Sources here: llava_rlhf, rlaifv_parquet, pairs_jsonl,
                 tfds_llava_rlhf, tfds_rlaifv.
  prompts        {"id", "image", "image_file", "question", "caption_type", "length_bonus",
                 "facts", "facts_key", ...} (`read_ppo_prompts`'s records). Sources here:
                 llava_rlhf_prompts, rlaifv_jsonl, prompts_jsonl.

Plugins (`lmm_align.plugins`) register more sources the same way, imported before a lookup:
the shapes world plugin registers shapes, shapes_pairs and shapes_prompts (its `data` module).

A source is a reader registered under its name: `@register(kind, name)` on a function
`reader(data_config, **options) -> (records, skipped)`. `data_config` is a run's `config.data`
(source, path, image_folder, captions_path, on_error, ...); options are what the trainer of
that kind knows and a source may need (the conversation encoding; the prompt mix's
yes_no_fraction). File readers take `data.path`: a file, a glob, or several (`data_paths`);
images load lazily (a file's, or a parquet row's, when a batch needs it).

A source that brings no published tokenizer (a synthetic world) may register the corpus its
own BPE tokenizer is trained on: `@register_tokenizer_corpus(name)` on a function
`corpus(data_config) -> (texts, vocab_size)`; `tokenizer_corpus(data_config)` finds it.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
from collections.abc import Callable
from typing import Any

import ml_collections

from lmm_align import plugins
from lmm_align.data import conversation

KINDS = ("conversations", "pairs", "prompts")
# Older configs named the file `json_path` (JSON / JSONL sources) or `parquet_paths`; read
# when `data.path` is empty.
LEGACY_PATH_FIELDS = ("json_path", "parquet_paths")

Reader = Callable[..., tuple[list[Any], collections.Counter]]
_READERS: dict[str, dict[str, Reader]] = {kind: {} for kind in KINDS}
TokenizerCorpus = Callable[[ml_collections.ConfigDict], tuple[list[str], int]]
_TOKENIZER_CORPORA: dict[str, TokenizerCorpus] = {}


@dataclasses.dataclass(frozen=True)
class ConversationEncoding:
  """How conversations become token ids: what the conversation readers need of the model."""

  tokenizer: Any
  template: conversation.ConversationTemplate
  num_image_tokens: int  # P: ids per image
  image_token_id: int


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"record kind {kind!r}: use one of {KINDS}")


def register(kind: str, name: str) -> Callable[[Reader], Reader]:
  """Decorator: registers `reader` as source `name` of record kind `kind`."""
  _check_kind(kind)

  def decorate(reader: Reader) -> Reader:
    if name in _READERS[kind] and _READERS[kind][name] is not reader:
      raise ValueError(f"{kind} source {name!r} is already registered")
    _READERS[kind][name] = reader
    return reader

  return decorate


def names(kind: str) -> tuple[str, ...]:
  """The registered source names of a kind (plugins' included), sorted."""
  _check_kind(kind)
  plugins.load()
  return tuple(sorted(_READERS[kind]))


def read(
  kind: str, data_config: ml_collections.ConfigDict, **options: Any
) -> tuple[list[Any], collections.Counter]:
  """The records of `data_config.source` (a source of `kind`) and the skipped counts."""
  _check_kind(kind)
  source = data_config.get("source", "")
  if source not in _READERS[kind]:
    plugins.load()
  if source not in _READERS[kind]:
    raise ValueError(
      f"data.source={source!r} is not a source of {kind}: use one of {list(names(kind))}"
    )
  records, skipped = _READERS[kind][source](data_config, **options)
  return records, collections.Counter(skipped)


def register_tokenizer_corpus(name: str) -> Callable[[TokenizerCorpus], TokenizerCorpus]:
  """Decorator: registers `corpus(data_config) -> (texts, vocab_size)`, the text a BPE
  tokenizer is trained on when a run on source `name` names no tokenizer."""

  def decorate(corpus: TokenizerCorpus) -> TokenizerCorpus:
    if name in _TOKENIZER_CORPORA and _TOKENIZER_CORPORA[name] is not corpus:
      raise ValueError(f"a tokenizer corpus for source {name!r} is already registered")
    _TOKENIZER_CORPORA[name] = corpus
    return corpus

  return decorate


def tokenizer_corpus(data_config: ml_collections.ConfigDict) -> tuple[list[str], int] | None:
  """(texts, vocab_size) to train `data_config.source`'s own tokenizer on, or None when the
  source registered no corpus (it then needs a published tokenizer)."""
  source = data_config.get("source", "")
  if source not in _TOKENIZER_CORPORA:
    plugins.load()
  corpus = _TOKENIZER_CORPORA.get(source)
  return None if corpus is None else corpus(data_config)


def tokenizer_corpus_names() -> tuple[str, ...]:
  """The sources with a registered tokenizer corpus (plugins' included), sorted."""
  plugins.load()
  return tuple(sorted(_TOKENIZER_CORPORA))


def data_paths(data_config: ml_collections.ConfigDict) -> list[str]:
  """The files `data.path` names: a path, a glob, or several of either (comma-separated, as a
  command-line override gives them, or a list), in the given order (each glob's matches
  sorted). Raises naming the field on an empty setting, a glob with no match or a missing
  file."""
  field, value = "path", data_config.get("path", "")
  if not value:
    for legacy in LEGACY_PATH_FIELDS:
      if data_config.get(legacy):
        field, value = legacy, data_config.get(legacy)
        break
  if not value:
    raise ValueError(
      f"data.path is empty: set it to a file, a glob or a list of shards (data.source="
      f"{data_config.get('source', '')!r})"
    )
  if isinstance(value, str):
    items = [v.strip() for v in value.split(",") if v.strip()]
  else:
    items = [value] if isinstance(value, os.PathLike) else list(value)
  out = []
  for item in items:
    item = os.fspath(item)
    if glob.has_magic(item):
      matches = sorted(glob.glob(item))
      if not matches:
        raise FileNotFoundError(f"data.{field}: no file matches {item!r}")
      out += matches
    elif not os.path.isfile(item):
      raise FileNotFoundError(f"data.{field}: file {item!r} not found")
    else:
      out.append(item)
  return out


def _optional(data_config: ml_collections.ConfigDict, field: str) -> str | None:
  return data_config.get(field) or None


def _check_images(data_config: ml_collections.ConfigDict, default: bool | str) -> bool | str:
  """data.check_images when set ("none" | "verify" | "decode"), else the reader's default."""
  return data_config.get("check_images") or default


def _read_each(read_one, paths: list[str]) -> tuple[list[Any], collections.Counter]:
  records, skipped = [], collections.Counter()
  for path in paths:
    file_records, file_skipped = read_one(path)
    records += file_records
    skipped.update(file_skipped)
  return records, skipped


# ------------------------------------------------------------------------------------------
# Conversations (SFT).
# ------------------------------------------------------------------------------------------


@register("conversations", "llava_json")
def _llava_json(data, *, encoding: ConversationEncoding):
  from lmm_align.data.llava_json import read_llava_json

  return _read_each(
    lambda path: read_llava_json(
      path, _optional(data, "image_folder"), encoding.tokenizer, template=encoding.template,
      num_image_tokens=encoding.num_image_tokens, image_token_id=encoding.image_token_id,
      on_error=data.get("on_error", "raise"), check_images=_check_images(data, True),
    ),
    data_paths(data),
  )  # fmt: skip


@register("conversations", "tfds")
def _tfds_conversations(data, *, encoding: ConversationEncoding):
  from lmm_align.data.tfds_llava import examples_from_tfds

  return examples_from_tfds(
    data.tfds_data_dir, data.tfds_split, encoding.tokenizer, template=encoding.template,
    num_image_tokens=encoding.num_image_tokens, image_token_id=encoding.image_token_id,
    on_error=data.get("on_error", "raise"),
  )  # fmt: skip


@register("conversations", "llava_critic_parquet")
def _llava_critic(data, *, encoding: ConversationEncoding):
  from lmm_align.data.critic_parquet import read_llava_critic_parquet

  return read_llava_critic_parquet(
    data_paths(data), encoding.tokenizer, template=encoding.template,
    num_image_tokens=encoding.num_image_tokens, image_token_id=encoding.image_token_id,
    on_error=data.get("on_error", "raise"), check_images=_check_images(data, False),
  )  # fmt: skip


# ------------------------------------------------------------------------------------------
# Preference pairs (reward model and DPO).
# ------------------------------------------------------------------------------------------


@register("pairs", "llava_rlhf")
def _llava_rlhf(data, **_options):
  from lmm_align.data import preference_sources

  return _read_each(
    lambda path: preference_sources.read_llava_rlhf_preferences(
      path, image_folder=_optional(data, "image_folder"),
      captions_path=_optional(data, "captions_path"), on_error=data.get("on_error", "raise"),
      check_images=_check_images(data, False),
    ),
    data_paths(data),
  )  # fmt: skip


@register("pairs", "rlaifv_parquet")
def _rlaifv_parquet(data, **_options):
  from lmm_align.data import preference_sources

  return preference_sources.read_rlaifv_parquet(
    data_paths(data),
    on_error=data.get("on_error", "raise"),
    check_images=_check_images(data, False),
  )


@register("pairs", "pairs_jsonl")
def _pairs_jsonl(data, **_options):
  from lmm_align.data import preference_sources

  return preference_sources.read_pairs_files(
    data_paths(data), data.get("image_folder") or "", on_error=data.get("on_error", "raise")
  )


def _tfds_pairs(name: str) -> Reader:
  def reader(data, **_options):
    from lmm_align.data import tfds_preference

    builder = getattr(tfds_preference, name)
    records = tfds_preference.records_from_tfds(data.tfds_data_dir, data.tfds_split, builder)
    return records, tfds_preference.skipped_at_build(data.tfds_data_dir, builder)

  return reader


register("pairs", "tfds_llava_rlhf")(_tfds_pairs("LLAVA_RLHF_NAME"))
register("pairs", "tfds_rlaifv")(_tfds_pairs("RLAIFV_NAME"))


# ------------------------------------------------------------------------------------------
# RL prompts (PPO, best-of-N, the iterative loop).
# ------------------------------------------------------------------------------------------


@register("prompts", "llava_rlhf_prompts")
def _llava_rlhf_prompts(data, **_options):
  from lmm_align.data import preference_sources

  return _read_each(
    lambda path: preference_sources.read_ppo_prompts(
      path, image_folder=_optional(data, "image_folder"),
      captions_path=_optional(data, "captions_path"), on_error=data.get("on_error", "raise"),
      check_images=_check_images(data, False),
    ),
    data_paths(data),
  )  # fmt: skip


@register("prompts", "rlaifv_jsonl")
def _rlaifv_jsonl(data, **_options):
  from lmm_align.data import prompt_sources

  return prompt_sources.read_rlaifv_prompts(
    data_paths(data), image_folder=_optional(data, "image_folder"), on_error=data.get("on_error", "raise"),
    check_images=_check_images(data, False),
  )  # fmt: skip


@register("prompts", "prompts_jsonl")
def _prompts_jsonl(data, **_options):
  from lmm_align.data import prompt_sources

  return prompt_sources.read_prompts_jsonl(
    data_paths(data), image_folder=_optional(data, "image_folder"), on_error=data.get("on_error", "raise"),
    check_images=_check_images(data, False),
  )  # fmt: skip
