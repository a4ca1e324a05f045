"""Declarative name maps between Hugging Face LLaVA (1.5, NeXT, OneVision) / LLaMA / Qwen2
checkpoints and our params.

One table per sub-model, read in both directions. A rule is (HF key template, our path
template, transform); `{i}` stands for a layer index. HF keys are first brought to one
canonical spelling (`canonical_key`), since transformers writes and reads three layouts:
the legacy names `save_pretrained` writes (`language_model.model.*`, `vision_tower.*`),
the hub's (`vision_tower.vision_model.*`) and the in-memory ones (`model.language_model.*`).

Transforms (HF is PyTorch-style: Linear weights are [out, in], convs [out, in, kh, kw]):
  copy      same tensor (norms, embeddings, flat biases)
  bias      HF [N*H] <-> ours [N, H]
  linear    HF [out, in] <-> ours kernel [in, *out] (the input is the first axis)
  linear_2  HF [out, N*H] <-> ours kernel [N, H, out] (the input spans two axes)
  conv      HF [D, C, kh, kw] <-> ours [kh, kw, C, D]
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from lmm_align.models.config import ModelConfig, VisionConfig


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str
  ours: str
  transform: str

  @property
  def layered(self) -> bool:
    return "{i}" in self.hf

  def hf_regex(self) -> re.Pattern:
    return re.compile("^" + re.escape(self.hf).replace(r"\{i\}", r"(\d+)") + "$")


_TEXT_LAYER = [
  ("self_attn.q_proj.weight", "q_proj/kernel", "linear"),
  ("self_attn.k_proj.weight", "k_proj/kernel", "linear"),
  ("self_attn.v_proj.weight", "v_proj/kernel", "linear"),
  ("self_attn.o_proj.weight", "o_proj/kernel", "linear_2"),
  ("mlp.gate_proj.weight", "gate_proj/kernel", "linear"),
  ("mlp.up_proj.weight", "up_proj/kernel", "linear"),
  ("mlp.down_proj.weight", "down_proj/kernel", "linear"),
  ("input_layernorm.weight", "input_layernorm/scale", "copy"),
  ("post_attention_layernorm.weight", "post_attention_layernorm/scale", "copy"),
]

_VISION_LAYER = [
  *[(f"self_attn.{p}_proj.weight", f"{p}_proj/kernel", "linear") for p in "qkv"],
  *[(f"self_attn.{p}_proj.bias", f"{p}_proj/bias", "bias") for p in "qkv"],
  ("self_attn.out_proj.weight", "out_proj/kernel", "linear_2"),
  ("self_attn.out_proj.bias", "out_proj/bias", "copy"),
  ("layer_norm1.weight", "layer_norm1/scale", "copy"),
  ("layer_norm1.bias", "layer_norm1/bias", "copy"),
  ("layer_norm2.weight", "layer_norm2/scale", "copy"),
  ("layer_norm2.bias", "layer_norm2/bias", "copy"),
  ("mlp.fc1.weight", "fc1/kernel", "linear"),
  ("mlp.fc1.bias", "fc1/bias", "copy"),
  ("mlp.fc2.weight", "fc2/kernel", "linear"),
  ("mlp.fc2.bias", "fc2/bias", "copy"),
]


def text_rules(config: ModelConfig) -> list[Rule]:
  rules = [
    Rule("language_model.embed_tokens.weight", "language_model/embed_tokens/embedding", "copy"),
    Rule("language_model.norm.weight", "language_model/norm/scale", "copy"),
    *[
      Rule(f"language_model.layers.{{i}}.{h}", f"language_model/layers/{{i}}/{o}", t)
      for h, o, t in _TEXT_LAYER
    ],
  ]
  if config.text.qkv_bias:  # Qwen2
    rules += [
      Rule(f"language_model.layers.{{i}}.self_attn.{p}_proj.bias",
           f"language_model/layers/{{i}}/{p}_proj/bias", "bias")
      for p in "qkv"
    ]  # fmt: skip
  if not config.text.tie_word_embeddings:
    rules.append(Rule("lm_head.weight", "language_model/lm_head/kernel", "linear"))
  return rules


def vision_rules() -> list[Rule]:
  v = "vision_tower"
  return [
    Rule(f"{v}.embeddings.class_embedding", f"{v}/class_embedding", "copy"),
    Rule(f"{v}.embeddings.patch_embedding.weight", f"{v}/patch_embedding/kernel", "conv"),
    Rule(f"{v}.embeddings.position_embedding.weight", f"{v}/position_embedding", "copy"),
    Rule(f"{v}.pre_layrnorm.weight", f"{v}/pre_layrnorm/scale", "copy"),
    Rule(f"{v}.pre_layrnorm.bias", f"{v}/pre_layrnorm/bias", "copy"),
    Rule(f"{v}.post_layernorm.weight", f"{v}/post_layernorm/scale", "copy"),
    Rule(f"{v}.post_layernorm.bias", f"{v}/post_layernorm/bias", "copy"),
    *[
      Rule(f"{v}.encoder.layers.{{i}}.{h}", f"{v}/layers/{{i}}/{o}", t) for h, o, t in _VISION_LAYER
    ],
  ]


def siglip_vision_rules(vision: VisionConfig) -> list[Rule]:
  """A SigLIP tower's: CLIP's encoder layers, a biased patch conv, no class token, no
  pre-LayerNorm, and the attention-pooling head when the config has one."""
  v = "vision_tower"
  rules = [
    Rule(f"{v}.embeddings.patch_embedding.weight", f"{v}/patch_embedding/kernel", "conv"),
    Rule(f"{v}.embeddings.patch_embedding.bias", f"{v}/patch_embedding/bias", "copy"),
    Rule(f"{v}.embeddings.position_embedding.weight", f"{v}/position_embedding", "copy"),
    Rule(f"{v}.post_layernorm.weight", f"{v}/post_layernorm/scale", "copy"),
    Rule(f"{v}.post_layernorm.bias", f"{v}/post_layernorm/bias", "copy"),
    *[
      Rule(f"{v}.encoder.layers.{{i}}.{h}", f"{v}/layers/{{i}}/{o}", t) for h, o, t in _VISION_LAYER
    ],
  ]
  if vision.use_head:
    h = f"{v}.head"
    rules += [
      Rule(f"{h}.probe", f"{v}/head/probe", "copy"),
      # [3D, D] with q, k, v stacked on the output axis <-> ours [D, 3, N, H].
      Rule(f"{h}.attention.in_proj_weight", f"{v}/head/in_proj_kernel", "linear"),
      Rule(f"{h}.attention.in_proj_bias", f"{v}/head/in_proj_bias", "bias"),
      Rule(f"{h}.attention.out_proj.weight", f"{v}/head/out_proj/kernel", "linear_2"),
      Rule(f"{h}.attention.out_proj.bias", f"{v}/head/out_proj/bias", "copy"),
      Rule(f"{h}.layernorm.weight", f"{v}/head/layernorm/scale", "copy"),
      Rule(f"{h}.layernorm.bias", f"{v}/head/layernorm/bias", "copy"),
      *[Rule(f"{h}.mlp.{n}.weight", f"{v}/head/{n}/kernel", "linear") for n in ("fc1", "fc2")],
      *[Rule(f"{h}.mlp.{n}.bias", f"{v}/head/{n}/bias", "copy") for n in ("fc1", "fc2")],
    ]
  return rules


def tower_rules(vision: VisionConfig) -> list[Rule]:
  """The rules of the config's vision tower, CLIP's or SigLIP's."""
  return siglip_vision_rules(vision) if vision.tower == "siglip" else vision_rules()


def projector_rules(config: ModelConfig) -> list[Rule]:
  names = ["linear_1", "linear_2"] if config.projector_type == "mlp2x_gelu" else ["linear_1"]
  rules = [
    Rule(f"multi_modal_projector.{n}.weight", f"multi_modal_projector/{n}/kernel", "linear")
    for n in names
  ]
  if config.projector_bias:
    rules += [
      Rule(f"multi_modal_projector.{n}.bias", f"multi_modal_projector/{n}/bias", "copy")
      for n in names
    ]
  return rules


def rules_for(config: ModelConfig) -> list[Rule]:
  rules = text_rules(config)
  if config.vision is not None:
    rules += tower_rules(config.vision) + projector_rules(config)
  if config.anyres:  # LLaVA-NeXT / OneVision: the learned row separator, [D] both ways
    rules.append(Rule("image_newline", "image_newline", "copy"))
  return rules


def our_path(template: str, layer: int | None, scan: bool) -> tuple[tuple[str, ...], int | None]:
  """Our flat param path for a rule's template, and the index into its stacked layer axis."""
  if layer is None:
    return tuple(template.split("/")), None
  if scan:
    return tuple(template.replace("/{i}", "").split("/")), layer
  return tuple(template.replace("layers/{i}", f"layers_{layer}").split("/")), None


def num_layers(config: ModelConfig, rule: Rule) -> int:
  return (
    config.vision.num_layers if rule.ours.startswith("vision_tower") else config.text.num_layers
  )


# Buffers some checkpoints carry that hold no parameters.
_IGNORED = (re.compile(r"(^|\.)position_ids$"), re.compile(r"rotary_emb\.inv_freq$"))

# (prefix as found, canonical prefix), longest first.
_PREFIXES = (
  ("model.vision_tower.vision_model.", "vision_tower."),
  ("model.vision_tower.", "vision_tower."),
  ("vision_tower.vision_model.", "vision_tower."),
  ("vision_tower.", "vision_tower."),
  ("model.multi_modal_projector.", "multi_modal_projector."),
  ("model.image_newline", "image_newline"),
  ("multi_modal_projector.", "multi_modal_projector."),
  ("language_model.model.", "language_model."),
  ("model.language_model.", "language_model."),
  ("language_model.lm_head.", "lm_head."),
  ("lm_head.", "lm_head."),
)


def canonical_key(key: str, text_only: bool) -> str | None:
  """The canonical spelling of a checkpoint key, or None for a buffer to ignore."""
  if any(p.search(key) for p in _IGNORED):
    return None
  if text_only and key.startswith("model."):
    return "language_model." + key[len("model.") :]
  for found, canonical in _PREFIXES:
    if key.startswith(found):
      return canonical + key[len(found) :]
  return key


def export_key(canonical: str, text_only: bool) -> str:
  """The key `save_pretrained` of transformers 5 writes for a canonical key."""
  if text_only:
    return (
      canonical
      if canonical.startswith("lm_head.")
      else "model." + canonical[len("language_model.") :]
    )
  if canonical.startswith("language_model."):
    return "language_model.model." + canonical[len("language_model.") :]
  if canonical.startswith("lm_head."):
    return "language_model." + canonical
  return canonical


def hf_shape(transform: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape the HF tensor must have for our param of `shape`."""
  if transform == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  if transform == "linear":
    return (int(np.prod(shape[1:])), shape[0])
  if transform == "linear_2":
    return (shape[-1], int(np.prod(shape[:-1])))
  if transform == "bias":
    return (int(np.prod(shape)),)
  return tuple(shape)


def to_ours(transform: str, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """An HF tensor as our param of `shape`; the caller has checked `hf_shape` already."""
  if transform == "conv":
    return np.transpose(tensor, (2, 3, 1, 0))
  if transform in ("linear", "linear_2"):
    return np.transpose(tensor).reshape(shape)
  return tensor.reshape(shape)


def to_hf(transform: str, param: np.ndarray) -> np.ndarray:
  if transform == "conv":
    return np.ascontiguousarray(np.transpose(param, (3, 2, 0, 1)))
  if transform == "linear":
    return np.ascontiguousarray(param.reshape(param.shape[0], -1).T)
  if transform == "linear_2":
    return np.ascontiguousarray(param.reshape(-1, param.shape[-1]).T)
  if transform == "bias":
    return param.reshape(-1)
  return param
