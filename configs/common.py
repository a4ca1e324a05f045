"""Presets every experiment config starts from. Fields here are the keys all trainers honour;
they name no data source and no evaluation (each recipe sets its own: the shapes world's
configs start from `configs.shapes.base_config`, which adds the world's)."""

from __future__ import annotations

import ml_collections

from lmm_align import sharding
from lmm_align.optim import default_optim_config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'model=7b,runlocal' -> ConfigDict(model='7b', runlocal=True), typed like the defaults."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise KeyError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if not value:
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = type(default)(value)
  return out


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.trainer = "sft"
  config.seed = 0
  config.total_steps = 1000
  config.batch_size = 32  # global, over all processes
  config.log_every = 10
  config.checkpoint_every = 500
  config.keep_checkpoints = 2
  # Restore precedence: the workdir's checkpoint, then resume, then init_from, then scratch.
  config.resume = ""  # another run's workdir or checkpoints dir, optionally DIR@STEP
  config.init_from = ""  # an HF LlavaForConditionalGeneration / LlamaForCausalLM folder
  config.tokenizer = ""  # a local tokenizer folder (default: init_from's, or the workdir's)
  config.trainable = (".*",)  # regexes over param paths; the rest is frozen

  config.model = ml_collections.ConfigDict(
    dict(
      variant="tiny",
      dtype="float32",
      param_dtype="float32",
      scan_layers=True,
      remat_policy="none",
      image_size=0,  # 0: the variant's
      vocab_from_tokenizer=False,
      # For a model built from its variant (LLaVA's stage 1: a pretrained CLIP and Vicuna, a
      # new projector): a CLIPVisionModel / SiglipVisionModel folder for the vision tower and
      # a LlamaForCausalLM / Qwen2ForCausalLM folder for the decoder; ignored with init_from.
      vision_init="",
      text_init="",
    )
  )
  # sizes: (data, fsdp, tensor), one may be -1; num_devices: 0 = all (fewer only for tests).
  # LoRA (rank 0 = off): adapters on dense layers whose module path matches a target regex;
  # the base stays frozen outside the train state, and `trainable` selects among adapters.
  config.lora = ml_collections.ConfigDict(
    dict(rank=0, alpha=16.0, dropout=0.0, targets=(r"language_model/.*_proj",))
  )
  config.mesh = ml_collections.ConfigDict(
    dict(sizes=(-1, 1, 1), rules=sharding.DEFAULT_RULES, num_devices=0)
  )
  config.optim = default_optim_config()
  config.data = ml_collections.ConfigDict(
    dict(
      source="",  # a source of lmm_align.data.registry (each recipe names its own)
      template="vicuna_v1",
      max_length=2048,
      buckets=(128, 256, 512, 1024, 2048),
      length_policy="truncate",  # or "drop"
      on_error="raise",  # or "skip": bad records are skipped and counted
      aspect_mode="pad",
      # The source's files: a path, a glob ("/data/RLAIF-V-Dataset_*.parquet") or several,
      # comma-separated; see lmm_align.data.registry for the sources of each record kind.
      path="",
      json_path="",  # the older name of `path`, read when `path` is empty
      image_folder="",
      captions_path="",  # LLaVA-RLHF image_to_caption JSON (facts for the reward model)
      check_images="",  # "none" | "verify" | "decode"; empty: each reader's default
      tfds_data_dir="",
      tfds_split="train",
    )
  )
  # The run's evaluation of its final model, when enabled: a kind of `lmm_align.evals.registry`
  # ("none"; "pope" on POPE question files; one a plugin registers: the shapes world's
  # "shapes", on held-out scenes). The iterative loop evaluates each round's policy with it and,
  # with select_metric set, names the best round (select_mode "max" or "min").
  config.eval = ml_collections.ConfigDict(
    dict(
      enabled=False,
      kind="none",
      num_scenes=64,
      batch_size=32,
      max_new_tokens=48,
      pope_per_split=64,
      limit=0,  # "pope": the first N questions of each file (0: all)
      pope=dict(paths="", image_folder=""),  # "pope": question files (one per split), images
      select_metric="",
      select_mode="max",
    )
  )
  config.sweep = ()  # ((name, {key: value, ...}), ...): `lmm-align sweep` runs each
  return config
