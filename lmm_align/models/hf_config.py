"""HF `config.json` dicts <-> our model configs: `from_hf_config` reads a LLaVA (1.5, NeXT,
OneVision), LLaMA / Qwen2 or CLIP / SigLIP config; `to_hf_config` writes what `from_pretrained`
loads."""

from __future__ import annotations

import dataclasses
from typing import Any

from lmm_align.models.anyres import LLAVA_NEXT_PINPOINTS, LLAVA_ONEVISION_PINPOINTS
from lmm_align.models.config import (
  LLAVA_FAMILIES,
  TEXT_MODEL_TYPES,
  ModelConfig,
  RopeScaling,
  RuntimeConfig,
  TextConfig,
  VisionConfig,
)


def _text_from_hf(d: dict[str, Any]) -> TextConfig:
  model_type = d.get("model_type", "llama")
  if model_type not in TEXT_MODEL_TYPES:
    raise ValueError(f"text model_type {model_type!r} is not supported (llama, qwen2)")
  heads = d["num_attention_heads"]
  rope = d.get("rope_parameters") or {}
  rope_theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
  scaling = d.get("rope_scaling") or (
    rope if rope.get("rope_type", "default") != "default" else None
  )
  rope_scaling = None
  if scaling:
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type == "llama3":
      rope_scaling = RopeScaling(
          rope_type="llama3", factor=float(scaling["factor"]),
          low_freq_factor=float(scaling["low_freq_factor"]),
          high_freq_factor=float(scaling["high_freq_factor"]),
          original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
      )  # fmt: skip
    elif rope_type == "linear":
      rope_scaling = RopeScaling(rope_type="linear", factor=float(scaling["factor"]))
    elif rope_type not in (None, "default"):
      raise ValueError(
        f"rope scaling type {rope_type!r} is not supported (default, linear, llama3)"
      )
  if model_type == "llama" and (d.get("attention_bias") or d.get("mlp_bias")):
    raise ValueError("LLaMA checkpoints with attention_bias or mlp_bias are not supported")
  if model_type == "qwen2" and (
    d.get("use_sliding_window") or "sliding_attention" in (d.get("layer_types") or ())
  ):
    # Every published Qwen2 checkpoint attends over the full context; a window would need a
    # second mask here and in the KV cache.
    raise ValueError(
      "Qwen2 use_sliding_window=true (layer_types with 'sliding_attention') is not supported"
    )
  return TextConfig(
    vocab_size=d["vocab_size"],
    hidden_size=d["hidden_size"],
    intermediate_size=d["intermediate_size"],
    num_layers=d["num_hidden_layers"],
    num_heads=heads,
    num_kv_heads=d.get("num_key_value_heads") or heads,
    head_dim=d.get("head_dim") or d["hidden_size"] // heads,
    rms_norm_eps=d.get("rms_norm_eps", 1e-6),
    rope_theta=float(rope_theta),
    rope_scaling=rope_scaling,
    max_position_embeddings=d.get("max_position_embeddings", 4096),
    tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
    pad_token_id=d.get("pad_token_id"),
    bos_token_id=d.get("bos_token_id"),
    eos_token_id=d.get("eos_token_id")
    if not isinstance(d.get("eos_token_id"), list)
    else d["eos_token_id"][0],
    model_type=model_type,
    qkv_bias=model_type == "qwen2",
  )


def _square(d: dict[str, Any], field: str) -> int:
  """SigLIP configs may give image_size / patch_size as [height, width]; ours are square."""
  value = d[field]
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"vision_config.{field}={value}: only square sizes are supported")
    value = value[0]
  return int(value)


def vision_config_from_hf(d: dict[str, Any]) -> VisionConfig:
  """A VisionConfig from a `CLIPVisionConfig` or `SiglipVisionConfig` dict."""
  model_type = d.get("model_type", "clip_vision_model")
  if model_type in ("clip_vision_model", "clip"):
    tower, act, eps = "clip", "quick_gelu", 1e-5
  elif model_type == "siglip_vision_model":
    tower, act, eps = "siglip", "gelu_pytorch_tanh", 1e-6
  else:
    raise ValueError(
      f"vision tower model_type {model_type!r} is not supported "
      "(clip_vision_model, siglip_vision_model)"
    )
  hidden_act = d.get("hidden_act", act)
  if hidden_act not in ("quick_gelu", "gelu", "gelu_pytorch_tanh"):
    raise ValueError(
      f"vision_config.hidden_act {hidden_act!r} is not supported (quick_gelu, gelu, gelu_pytorch_tanh)"
    )
  return VisionConfig(
    image_size=_square(d, "image_size"),
    patch_size=_square(d, "patch_size"),
    hidden_size=d["hidden_size"],
    intermediate_size=d["intermediate_size"],
    num_layers=d["num_hidden_layers"],
    num_heads=d["num_attention_heads"],
    layer_norm_eps=d.get("layer_norm_eps", eps),
    hidden_act=hidden_act,
    num_channels=d.get("num_channels", 3),
    tower=tower,
    # SiglipVisionConfig's default is a head; a config.json that omits the field has one.
    use_head=tower == "siglip" and bool(d.get("vision_use_head", True)),
  )


# Per family: (vision_feature_layer, select strategy) defaults of its transformers config class.
_FAMILY_FEATURE_DEFAULTS = {
  "llava": (-2, "default"),
  "llava_next": (-2, "default"),
  "llava_onevision": (-1, "full"),
}
_ARCHITECTURES = {
  "llava": "LlavaForConditionalGeneration",
  "llava_next": "LlavaNextForConditionalGeneration",
  "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}


def from_hf_config(d: dict[str, Any], runtime: RuntimeConfig | None = None) -> ModelConfig:
  """A ModelConfig from the dict of a `LlavaForConditionalGeneration` (CLIP or SigLIP tower,
  LLaMA or Qwen2 decoder), `LlavaNextForConditionalGeneration`,
  `LlavaOnevisionForConditionalGeneration`, `LlamaForCausalLM` or `Qwen2ForCausalLM`
  config.json. Missing fields take the transformers class defaults."""
  runtime = runtime or RuntimeConfig()
  model_type = d.get("model_type")
  if model_type in LLAVA_FAMILIES:
    text = _text_from_hf(d["text_config"])
    if "tie_word_embeddings" in d and "tie_word_embeddings" not in d["text_config"]:
      text = dataclasses.replace(text, tie_word_embeddings=bool(d["tie_word_embeddings"]))
    act = d.get("projector_hidden_act", "gelu")
    if act != "gelu":
      raise ValueError(f"projector_hidden_act {act!r} is not supported (gelu)")
    layer, strategy = _FAMILY_FEATURE_DEFAULTS[model_type]
    anyres: dict[str, Any] = {}
    if model_type == "llava_next":
      anyres["image_grid_pinpoints"] = d.get("image_grid_pinpoints") or LLAVA_NEXT_PINPOINTS
    elif model_type == "llava_onevision":
      anyres["image_grid_pinpoints"] = d.get("image_grid_pinpoints") or LLAVA_ONEVISION_PINPOINTS
      anyres["vision_aspect_ratio"] = d.get("vision_aspect_ratio", "anyres_max_9")
      anyres["video_token_id"] = d.get("video_token_index", d.get("video_token_id", 151647))
    default_image_token = {"llava": 32000, "llava_next": 32000, "llava_onevision": 151646}
    return ModelConfig(
      text=text,
      vision=vision_config_from_hf(d["vision_config"]),
      projector_type="mlp2x_gelu",
      projector_bias=bool(d.get("multimodal_projector_bias", True)),
      vision_feature_layer=d.get("vision_feature_layer", layer),
      vision_feature_select_strategy=d.get("vision_feature_select_strategy", strategy),
      image_token_id=d.get(
        "image_token_index", d.get("image_token_id", default_image_token[model_type])
      ),
      runtime=runtime,
      **anyres,
    )
  if model_type in TEXT_MODEL_TYPES:
    return ModelConfig(text=_text_from_hf(d), runtime=runtime)
  if model_type in ("clip_vision_model", "clip", "siglip_vision_model", "siglip"):
    raise ValueError(
      f"config.json model_type {model_type!r} is a vision tower alone; read it into a LLaVA's "
      "tower with lmm_align.hf.load_vision_tower"
    )
  raise ValueError(
    f"config.json model_type {model_type!r} is not supported "
    f"({', '.join(LLAVA_FAMILIES + TEXT_MODEL_TYPES)})"
  )


def _text_to_hf(t: TextConfig, dtype: str) -> dict[str, Any]:
  rope: dict[str, Any] = {"rope_theta": t.rope_theta, "rope_type": "default"}
  if t.rope_scaling is not None:
    rope["rope_type"] = t.rope_scaling.rope_type
    rope["factor"] = t.rope_scaling.factor
    if t.rope_scaling.rope_type == "llama3":
      rope.update(
        low_freq_factor=t.rope_scaling.low_freq_factor,
        high_freq_factor=t.rope_scaling.high_freq_factor,
        original_max_position_embeddings=t.rope_scaling.original_max_position_embeddings,
      )
  if t.model_type == "qwen2":
    if not t.qkv_bias:
      raise ValueError("a Qwen2 TextConfig without qkv_bias has no transformers equivalent")
    family = {
      "use_sliding_window": False,
      "sliding_window": None,
      "max_window_layers": t.num_layers,
      "layer_types": ["full_attention"] * t.num_layers,
    }
  else:
    if t.qkv_bias:
      raise ValueError("a LLaMA TextConfig with qkv_bias has no transformers equivalent")
    family = {"attention_bias": False, "mlp_bias": False}
  return {
    "model_type": t.model_type,
    "vocab_size": t.vocab_size,
    "hidden_size": t.hidden_size,
    "intermediate_size": t.intermediate_size,
    "num_hidden_layers": t.num_layers,
    "num_attention_heads": t.num_heads,
    "num_key_value_heads": t.num_kv_heads,
    "head_dim": t.head_dim,
    "hidden_act": "silu",
    "rms_norm_eps": t.rms_norm_eps,
    "rope_parameters": rope,
    "max_position_embeddings": t.max_position_embeddings,
    "tie_word_embeddings": t.tie_word_embeddings,
    **family,
    "pad_token_id": t.pad_token_id,
    "bos_token_id": t.bos_token_id,
    "eos_token_id": t.eos_token_id,
    "dtype": dtype,
  }


def to_hf_config(config: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
  """The config.json dict that `transformers` reads back into an equivalent model."""
  text = _text_to_hf(config.text, dtype)
  if config.vision is None:
    architectures = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    return {**text, "architectures": [architectures[config.text.model_type]]}
  if config.projector_type != "mlp2x_gelu":
    raise ValueError(
      "transformers' LlavaForConditionalGeneration has only the mlp2x_gelu projector"
    )
  layer = config.vision_feature_layer
  family = config.family
  anyres: dict[str, Any] = {}
  if config.anyres:
    anyres["image_grid_pinpoints"] = [list(pin) for pin in config.image_grid_pinpoints]
  if family == "llava_onevision":
    anyres["vision_aspect_ratio"] = config.vision_aspect_ratio
    if config.video_token_id is not None:
      anyres["video_token_index"] = config.video_token_id
  return {
    "model_type": family,
    "architectures": [_ARCHITECTURES[family]],
    "text_config": text,
    "vision_config": vision_config_to_hf(config.vision),
    "image_token_index": config.image_token_id,
    # transformers' llava / llava_next field (features of one image / of the base tile).
    **({} if family == "llava_onevision" else {"image_seq_length": config.features_per_tile}),
    **anyres,
    "projector_hidden_act": config.projector_hidden_act,
    "multimodal_projector_bias": config.projector_bias,
    "vision_feature_layer": layer if isinstance(layer, int) else list(layer),
    "vision_feature_select_strategy": config.vision_feature_select_strategy,
    "tie_word_embeddings": config.text.tie_word_embeddings,
    "dtype": dtype,
  }


def vision_config_to_hf(v: VisionConfig) -> dict[str, Any]:
  """The `CLIPVisionConfig` or `SiglipVisionConfig` dict of a tower."""
  d = {
    "model_type": "clip_vision_model" if v.tower == "clip" else "siglip_vision_model",
    "image_size": v.image_size,
    "patch_size": v.patch_size,
    "hidden_size": v.hidden_size,
    "intermediate_size": v.intermediate_size,
    "num_hidden_layers": v.num_layers,
    "num_attention_heads": v.num_heads,
    "layer_norm_eps": v.layer_norm_eps,
    "hidden_act": v.hidden_act,
    "num_channels": v.num_channels,
  }
  if v.tower == "clip":
    d["projection_dim"] = v.hidden_size
  else:
    d["vision_use_head"] = v.use_head
  return d
