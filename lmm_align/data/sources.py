"""Where a run's tokenizer, image preprocessing and supervised examples come from, by config.

data.source: any "conversations" source of `lmm_align.data.registry` (llava_json, tfds,
llava_critic_parquet, and those plugins register, such as the shapes world's "shapes").
"""

from __future__ import annotations

import json
import os
import pathlib
from collections import Counter
from typing import Any

import ml_collections

from lmm_align.data import conversation, registry
from lmm_align.data.anyres import AnyresImageConfig
from lmm_align.data.anyres import image_config_for_model as anyres_image_config
from lmm_align.data.images import CLIP_VIT_L14_336, ImageProcessorConfig
from lmm_align.data.pipeline import AnyresTiling, Example, SupervisedData
from lmm_align.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from lmm_align.models.config import ModelConfig

TOKENIZER_DIR = "tokenizer"


def tokenizer_for(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """config.tokenizer, else init_from's tokenizer, else the workdir's, else (a source with a
  registered tokenizer corpus, such as the shapes world) a BPE trained on the source's text
  and saved in the workdir so restarts reuse it."""
  if config.tokenizer:
    return load_tokenizer(config.tokenizer)
  if config.init_from:
    return load_tokenizer(config.init_from)
  saved = pathlib.Path(workdir) / TOKENIZER_DIR
  if saved.is_dir():
    return load_tokenizer(saved)
  corpus = registry.tokenizer_corpus(config.data)
  if corpus is None:
    raise ValueError(
      f"set config.tokenizer or config.init_from: data.source={config.data.source!r} trains no "
      f"tokenizer of its own (sources that do: {list(registry.tokenizer_corpus_names())})"
    )
  texts, vocab_size = corpus
  return train_bpe_tokenizer(texts, vocab_size, out_dir=saved)


def image_config_for(
  config: ml_collections.ConfigDict, model: ModelConfig
) -> ImageProcessorConfig | AnyresImageConfig | None:
  """The preprocessing that matches the model: init_from's preprocessor_config.json when it has
  one, else CLIP's statistics at the vision tower's size (pad or crop per data.aspect_mode).
  An anyres model (LLaVA-NeXT, OneVision) gets its tiling processor (`AnyresImageConfig`)."""
  if model.vision is None:
    return None
  if model.anyres:
    path = pathlib.Path(config.init_from or "") / "preprocessor_config.json"
    hf_dict = json.loads(path.read_text()) if config.init_from and path.exists() else None
    return anyres_image_config(model, hf_dict, str(path) if hf_dict else "the model")
  if config.init_from:
    for name in ("preprocessor_config.json", "processor_config.json"):
      path = pathlib.Path(config.init_from) / name
      if path.exists():
        image_config = ImageProcessorConfig.from_hf_dict(json.loads(path.read_text()))
        return ImageProcessorConfig(
          **{**image_config.__dict__, "aspect_mode": config.data.aspect_mode}
        )
  size = model.vision.image_size
  return ImageProcessorConfig(
    size=size,
    crop_size=size,
    mean=CLIP_VIT_L14_336.mean,
    std=CLIP_VIT_L14_336.std,
    aspect_mode=config.data.aspect_mode,
  )


def conversation_encoding(
  config: ml_collections.ConfigDict, tokenizer: Any, model: ModelConfig
) -> registry.ConversationEncoding:
  """How this run turns conversations into ids (config.data.template, the model's P and id)."""
  return registry.ConversationEncoding(
    tokenizer,
    conversation.get_template(config.data.template),
    model.num_image_tokens,
    model.image_token_id,
  )


def sft_examples(
  config: ml_collections.ConfigDict, tokenizer: Any, model: ModelConfig
) -> tuple[list[Example], Counter]:
  """The encoded examples of config.data.source, any registered conversations source."""
  return registry.read(
    "conversations", config.data, encoding=conversation_encoding(config, tokenizer, model)
  )


def sft_data(
  config: ml_collections.ConfigDict, tokenizer: Any, model: ModelConfig
) -> SupervisedData:
  examples, skipped = sft_examples(config, tokenizer, model)
  if skipped:
    print(f"[data] skipped records: {dict(skipped)}")
  image_config, tiling = image_batching(config, model)
  return SupervisedData(
    examples,
    image_config,
    tiling=tiling,
    max_length=config.data.max_length,
    buckets=tuple(config.data.buckets),
    length_policy=config.data.length_policy,
    image_token_id=model.image_token_id,
    pad_id=tokenizer.pad_token_id,
    seed=config.seed,
    skipped=skipped,
  )


def image_batching(
  config: ml_collections.ConfigDict, model: ModelConfig
) -> tuple[ImageProcessorConfig | None, AnyresTiling | None]:
  """How batches carry the model's images: (a single-image processor, None), or for an anyres
  model (None, its tiling); (None, None) for a text-only model."""
  image_config = image_config_for(config, model)
  if isinstance(image_config, AnyresImageConfig):
    return None, anyres_tiling(config, model, image_config)
  return image_config, None


def anyres_tiling(
  config: ml_collections.ConfigDict, model: ModelConfig, image_config: AnyresImageConfig
) -> AnyresTiling:
  """An anyres model's batching, its rows' tiles padded to `tile_buckets`."""
  return AnyresTiling(
    image_config, model.packing, tile_buckets(config, model), model.num_image_tokens
  )


def tile_buckets(config: ml_collections.ConfigDict, model: ModelConfig) -> tuple[int, ...]:
  """data.tile_buckets; by default one bucket, the most tiles an image can take
  (`packing.max_tiles_per_image`)."""
  return tuple(config.data.get("tile_buckets") or (model.packing.max_tiles_per_image,))


def workdir_tokenizer_path(workdir: str) -> str:
  return os.path.join(workdir, TOKENIZER_DIR)
