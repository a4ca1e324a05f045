"""Import and export of Hugging Face checkpoint folders (safetensors; no pickle, no remote code).

`load_pretrained` reads one tensor at a time into a preallocated host array per parameter
(stacked over layers when the model scans), so a 13B checkpoint never sits twice in host
memory; with `shardings` each finished parameter goes straight to its devices.
`save_pretrained` writes the layout transformers 5 writes, sharded above `max_shard_bytes`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import flax
import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lmm_align import sharding
from lmm_align.hf import name_map
from lmm_align.models.config import ModelConfig, RuntimeConfig
from lmm_align.models.hf_config import (
  from_hf_config,
  to_hf_config,
  vision_config_from_hf,
  vision_config_to_hf,
)
from lmm_align.models.llava import Llava, dummy_inputs

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
_NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class CheckpointError(ValueError):
  """A checkpoint folder that cannot be loaded as asked; the message names what is wrong."""


def _safetensors_files(folder: pathlib.Path) -> list[pathlib.Path]:
  index = folder / SAFE_INDEX
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = sorted({folder / name for name in weight_map.values()})
    absent = [f.name for f in files if not f.exists()]
    if absent:
      raise CheckpointError(f"{index} lists shard files that do not exist: {absent}")
    return files
  if (folder / SAFE_SINGLE).exists():
    return [folder / SAFE_SINGLE]
  files = sorted(folder.glob("*.safetensors"))
  if files:
    return files
  bins = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
  if bins:
    raise CheckpointError(
      f"{folder} holds only pickled PyTorch weights ({', '.join(bins)}); lmm_align never unpickles "
      "them by default. Convert once with transformers: "
      "`Model.from_pretrained(folder).save_pretrained(out, safe_serialization=True)`, "
      "or pass allow_torch_bin=True to read them with torch.load(weights_only=True)."
    )
  raise CheckpointError(f"{folder} has no model.safetensors, no {SAFE_INDEX} and no *.safetensors")


def _iter_tensors(
  folder: pathlib.Path, allow_torch_bin: bool
) -> Iterator[tuple[str, Callable[[], np.ndarray], str]]:
  """(key, loader, file name) for every tensor; the loader reads that one tensor."""
  try:
    files = _safetensors_files(folder)
  except CheckpointError:
    if not allow_torch_bin or not list(folder.glob("*.bin")):
      raise
    yield from _iter_torch_bin(folder)
    return
  for path in files:
    with safe_open(str(path), framework="numpy") as reader:
      for key in reader.keys():
        yield key, (lambda r=reader, k=key: r.get_tensor(k)), path.name


def _iter_torch_bin(folder: pathlib.Path):
  import torch  # only for this opt-in path

  for path in sorted(folder.glob("*.bin")):
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for key, tensor in state.items():
      yield (
        key,
        (lambda t=tensor: t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()),
        path.name,
      )


def _flat_abstract_params(model: Llava) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  shapes = jax.eval_shape(model.init, jax.random.key(0), *dummy_inputs(model.config))
  # Unboxed without the sharding constraint: these are shapes, and a caller's mesh context
  # would otherwise try to constrain them.
  unboxed = jax.tree.map(
    lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
    shapes["params"],
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )
  return flax.traverse_util.flatten_dict(unboxed)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
  folder = pathlib.Path(path)
  if not folder.is_dir():
    raise CheckpointError(f"{folder} is not a directory")
  config_file = folder / "config.json"
  if not config_file.exists():
    raise CheckpointError(f"{folder} has no config.json")
  return json.loads(config_file.read_text())


def load_pretrained(
  path: str | os.PathLike,
  dtype: str = "float32",
  runtime: RuntimeConfig | None = None,
  shardings: Any = None,
  allow_torch_bin: bool = False,
) -> tuple[Llava, dict]:
  """Reads a local `LlavaForConditionalGeneration` (CLIP or SigLIP tower, LLaMA or Qwen2
  decoder), `LlavaNextForConditionalGeneration`, `LlavaOnevisionForConditionalGeneration`
  (their `image_newline` included), `LlamaForCausalLM` or `Qwen2ForCausalLM` folder.

  dtype: the params' dtype (and the compute dtype unless `runtime` says otherwise).
  shardings: optional pytree of `jax.sharding.Sharding` matching the params; each param is
    placed with it as soon as it is complete.
  Returns (model, params): `model.apply({"params": params}, input_ids, pixel_values=...)`
  (anyres families: pixel_values [B, tiles, H, W, 3] and `image_sizes=` [B, 2] too).
  Raises CheckpointError listing missing, unexpected and mis-shaped tensors, or naming the
  config.json field it cannot read (an unsupported model_type, a sliding window, ...).
  """
  folder = pathlib.Path(path)
  runtime = runtime or RuntimeConfig(dtype=dtype, param_dtype=dtype)
  model = pretrained_model(folder, runtime=runtime)
  config = model.config
  text_only = config.vision is None

  def canonical(key: str) -> str | None:
    canonical = name_map.canonical_key(key, text_only)
    if canonical == "lm_head.weight" and config.text.tie_word_embeddings:
      return None  # the tied copy of embed_tokens
    return canonical

  abstract = _flat_abstract_params(model)
  rules = name_map.rules_for(config)
  params = _read_params(folder, abstract, rules, canonical, runtime, shardings, allow_torch_bin)
  return model, params


def pretrained_model(
  path: str | os.PathLike, dtype: str = "float32", runtime: RuntimeConfig | None = None
) -> Llava:
  """The Llava a folder's config.json describes, as `load_pretrained` builds it, without
  reading a weight: what a caller needs to derive the params' shardings before loading."""
  runtime = runtime or RuntimeConfig(dtype=dtype, param_dtype=dtype)
  return Llava(_model_config(pathlib.Path(path), runtime))


def _model_config(folder: pathlib.Path, runtime: RuntimeConfig) -> ModelConfig:
  """The folder's ModelConfig; a config.json we cannot read is an error naming the file."""
  d = read_config(folder)
  try:
    return from_hf_config(d, runtime)
  except (KeyError, ValueError) as e:
    model_type = d.get("model_type")
    what = f"no field {e} (model_type {model_type!r})" if isinstance(e, KeyError) else str(e)
    raise CheckpointError(f"{folder / 'config.json'}: {what}") from e


def _read_params(
  folder: pathlib.Path,
  abstract: dict[tuple[str, ...], jax.ShapeDtypeStruct],
  rules: list[name_map.Rule],
  canonical_key: Callable[[str], str | None],
  runtime: RuntimeConfig,
  shardings: Any,
  allow_torch_bin: bool,
) -> dict:
  """Every param of `abstract` from the folder's tensors (keys mapped by `canonical_key`, None
  to skip one; then by `rules`), or a CheckpointError listing what is missing, unexpected or
  mis-shaped. Each param goes to its devices as soon as it is complete (a stacked one: when its
  last layer is read), so the host holds at most the stacks still filling, not the model."""
  np_dtype = _NUMPY_DTYPES[runtime.param_dtype]
  compiled = [(rule, rule.hf_regex()) for rule in rules]
  scan = runtime.scan_layers
  flat_shardings = flax.traverse_util.flatten_dict(shardings) if shardings is not None else {}
  host: dict[tuple[str, ...], np.ndarray] = {}  # stacks still filling
  layers_read: dict[tuple[str, ...], int] = {}
  params: dict[tuple[str, ...], jax.Array] = {}
  filled: set[tuple[tuple[str, ...], int | None]] = set()
  unexpected, mis_shaped, repeated = [], [], []
  for key, load, file_name in _iter_tensors(folder, allow_torch_bin):
    canonical = canonical_key(key)
    if canonical is None:
      continue
    match = next(((rule, m) for rule, regex in compiled if (m := regex.match(canonical))), None)
    if match is None:
      unexpected.append(f"{key} ({file_name})")
      continue
    rule, m = match
    layer = int(m.group(1)) if rule.layered else None
    our_path, index = name_map.our_path(rule.ours, layer, scan)
    if our_path not in abstract:
      unexpected.append(f"{key} ({file_name}): layer {layer} beyond the config's layers")
      continue
    full_shape = tuple(abstract[our_path].shape)
    shape = full_shape[1:] if index is not None else full_shape
    if index is not None and index >= full_shape[0]:
      unexpected.append(
        f"{key} ({file_name}): layer {layer} beyond the config's {full_shape[0]} layers"
      )
      continue
    tensor = load()
    expected = name_map.hf_shape(rule.transform, shape)
    if tuple(tensor.shape) != expected:
      mis_shaped.append(f"{key} ({file_name}): {tuple(tensor.shape)}, expected {expected}")
      continue
    value = name_map.to_ours(rule.transform, tensor, shape).astype(np_dtype)
    if (our_path, index) in filled:
      repeated.append(f"{key} ({file_name})")
      continue
    filled.add((our_path, index))
    if index is None:
      params[our_path] = place_on_devices(value, flat_shardings.get(our_path))
      continue
    if our_path not in host:
      host[our_path] = np.empty(full_shape, np_dtype)
    host[our_path][index] = value
    layers_read[our_path] = layers_read.get(our_path, 0) + 1
    if layers_read[our_path] == full_shape[0]:
      params[our_path] = place_on_devices(host.pop(our_path), flat_shardings.get(our_path))

  expected_slots = {
    (p, i)
    for p, s in abstract.items()
    for i in (range(s.shape[0]) if scan and "layers" in p else [None])
  }
  missing = sorted(
    f"{'/'.join(p)}" + (f"[layer {i}]" if i is not None else "") for p, i in expected_slots - filled
  )
  problems = []
  if missing:
    problems.append(f"missing {len(missing)} tensor(s) for params: {missing[:20]}")
  if unexpected:
    problems.append(f"unexpected {len(unexpected)} tensor(s): {unexpected[:20]}")
  if mis_shaped:
    problems.append(f"mis-shaped {len(mis_shaped)} tensor(s): {mis_shaped[:20]}")
  if repeated:
    problems.append(f"{len(repeated)} tensor(s) for a param already read: {repeated[:20]}")
  if problems:
    raise CheckpointError(f"cannot load {folder}: " + "; ".join(problems))

  return flax.traverse_util.unflatten_dict(params)


def place_on_devices(value: Any, placement: jax.sharding.Sharding | None) -> jax.Array:
  """A host tensor on its devices (None: the default device); with a sharding, through
  `sharding.from_host`, so a mesh may span several hosts. Every process reads the same folder,
  so the slices agree."""
  if placement is None:
    return jax.device_put(value)
  return sharding.from_host(value, placement)


# --------------------------------------------------------------------------------------------
# A vision tower alone: LLaVA's stage 1 starts from a pretrained CLIP (or SigLIP).
# --------------------------------------------------------------------------------------------

# Older, CLIPModel and SiglipModel checkpoints prefix the tower's keys with "vision_model.";
# transformers 5 writes a CLIPVisionModel or SiglipVisionModel without it.
_VISION_PREFIX = "vision_model."
_VISION_ROOTS = {
  "clip": ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm."),
  "siglip": ("embeddings.", "encoder.", "post_layernorm.", "head."),
}
# model_type of a tower alone, and of the two-tower model that holds one as "vision_config".
_TOWER_TYPES = {
  "clip_vision_model": ("clip", False),
  "clip": ("clip", True),
  "siglip_vision_model": ("siglip", False),
  "siglip": ("siglip", True),
}
_TOWER_ARCHITECTURES = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}


def load_vision_tower(
  path: str | os.PathLike,
  config: ModelConfig,
  shardings: Any = None,
  allow_torch_bin: bool = False,
) -> dict:
  """The `vision_tower` params of `config`'s LLaVA from a local `CLIPVisionModel`, `CLIPModel`,
  `SiglipVisionModel` or `SiglipModel` folder (a text tower and projections are skipped).

  The folder's vision config must equal `config.vision` (a CheckpointError says which fields
  differ). shardings: optional pytree for the returned subtree (`params["vision_tower"]`).
  """
  folder = pathlib.Path(path)
  d = read_config(folder)
  if d.get("model_type") not in _TOWER_TYPES:
    raise CheckpointError(
      f"{folder}/config.json: model_type {d.get('model_type')!r}; a vision tower folder is a "
      "CLIPVisionModel ('clip_vision_model'), CLIPModel ('clip'), SiglipVisionModel "
      "('siglip_vision_model') or SiglipModel ('siglip')"
    )
  tower, nested = _TOWER_TYPES[d["model_type"]]
  try:
    found = vision_config_from_hf(d["vision_config"] if nested else d)
  except (KeyError, ValueError) as e:
    raise CheckpointError(f"{folder}/config.json: {e}") from e
  if config.vision is None:
    raise CheckpointError(f"cannot load {folder}: the model config has no vision tower")
  if found != config.vision:
    diff = {
      f.name: (getattr(found, f.name), getattr(config.vision, f.name))
      for f in dataclasses.fields(found)
      if getattr(found, f.name) != getattr(config.vision, f.name)
    }
    raise CheckpointError(
      f"{folder}: vision config differs from the model's (folder, model): {diff}"
    )

  def canonical(key: str) -> str | None:
    key = key.removeprefix(_VISION_PREFIX)
    if not key.startswith(_VISION_ROOTS[tower]):
      return None  # CLIPModel's / SiglipModel's text tower, projections and logit scale
    return "vision_tower." + key

  abstract = {
    p: s for p, s in _flat_abstract_params(Llava(config)).items() if p[0] == "vision_tower"
  }
  params = _read_params(
    folder, abstract, name_map.tower_rules(config.vision), canonical, config.runtime,
    None if shardings is None else {"vision_tower": shardings}, allow_torch_bin,
  )  # fmt: skip
  return params["vision_tower"]


# --------------------------------------------------------------------------------------------
# A language model alone: LLaVA's stage 1 starts its decoder from Vicuna (or Qwen2).
# --------------------------------------------------------------------------------------------

# Fields of the decoder that say how it computes; its special token ids and position limit
# may differ between the LLM and the LLaVA built on it.
_TEXT_ARCHITECTURE_FIELDS = (
  "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
  "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings", "model_type", "qkv_bias",
)  # fmt: skip


def load_language_model(
  path: str | os.PathLike,
  config: ModelConfig,
  shardings: Any = None,
  allow_torch_bin: bool = False,
) -> dict:
  """The `language_model` params of `config`'s LLaVA from a local `LlamaForCausalLM` or
  `Qwen2ForCausalLM` folder (Vicuna-v1.5 for LLaVA-1.5, Qwen2 for OneVision).

  The folder's decoder must compute as `config.text` does (a CheckpointError names the fields
  that differ). Its vocabulary may be smaller than the model's: LLaVA's tokenizer adds tokens
  (llava-hf pads Vicuna's 32000 to 32064), and the added rows of the embedding and the LM head
  start at the mean of the folder's rows, as `resize_token_embeddings` centres them (without its
  random spread). shardings: optional pytree for the returned subtree.
  """
  folder = pathlib.Path(path)
  d = read_config(folder)
  try:
    found = from_hf_config(d)
  except (KeyError, ValueError) as e:
    raise CheckpointError(f"{folder}/config.json: {e}") from e
  if found.vision is not None:
    raise CheckpointError(
      f"{folder}/config.json: model_type {d.get('model_type')!r} is a LLaVA; a language model "
      "folder is a LlamaForCausalLM or Qwen2ForCausalLM (load a LLaVA with init_from)"
    )
  diff = {
    f: (getattr(found.text, f), getattr(config.text, f))
    for f in _TEXT_ARCHITECTURE_FIELDS
    if getattr(found.text, f) != getattr(config.text, f)
  }
  if diff:
    raise CheckpointError(f"{folder}: text config differs from the model's (folder, model): {diff}")
  vocab, folder_vocab = config.text.vocab_size, found.text.vocab_size
  if folder_vocab > vocab:
    raise CheckpointError(
      f"{folder}: vocab_size {folder_vocab} is larger than the model's {vocab}: the model "
      "cannot hold the folder's embedding rows"
    )
  # Read at the folder's vocabulary, then append the added rows.
  text_model = Llava(dataclasses.replace(config, vision=None, text=found.text))
  abstract = {
    p: s for p, s in _flat_abstract_params(text_model).items() if p[0] == "language_model"
  }
  params = _read_params(
    folder, abstract, name_map.text_rules(dataclasses.replace(config, text=found.text)),
    lambda key: name_map.canonical_key(key, text_only=True), config.runtime, None,
    allow_torch_bin,
  )["language_model"]  # fmt: skip
  if folder_vocab < vocab:
    params = dict(params)
    embed = np.asarray(params["embed_tokens"]["embedding"])  # [V, D]
    params["embed_tokens"] = {"embedding": _append_mean_rows(embed, vocab, axis=0)}
    if "lm_head" in params:
      kernel = np.asarray(params["lm_head"]["kernel"])  # [D, V]
      params["lm_head"] = {"kernel": _append_mean_rows(kernel, vocab, axis=1)}
  if shardings is not None:
    params = jax.tree.map(place_on_devices, params, shardings)
  return params


def _append_mean_rows(table: np.ndarray, size: int, axis: int) -> np.ndarray:
  mean = table.astype(np.float32).mean(axis=axis, keepdims=True).astype(table.dtype)
  extra = np.repeat(mean, size - table.shape[axis], axis=axis)
  return np.concatenate([table, extra], axis=axis)


def save_vision_tower(
  config: ModelConfig, vision_params: dict, out_dir: str | os.PathLike
) -> pathlib.Path:
  """Writes `params["vision_tower"]` as a `CLIPVisionModel` or `SiglipVisionModel` folder
  (config.json, safetensors), with the keys transformers 5 writes."""
  if config.vision is None:
    raise CheckpointError("save_vision_tower: the model config has no vision tower")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  hf_config = {
    **vision_config_to_hf(config.vision),
    "architectures": [_TOWER_ARCHITECTURES[config.vision.tower]],
    "dtype": str(np.dtype(jax.tree.leaves(vision_params)[0].dtype)),
  }
  tensors = {}
  rules = name_map.tower_rules(config.vision)
  for key, tensor in _iter_export(config, {"vision_tower": vision_params}, rules):
    tensors[key.removeprefix("vision_tower.")] = tensor
  save_file(tensors, str(out / SAFE_SINGLE), metadata={"format": "pt"})
  (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  return out


def _iter_export(
  config: ModelConfig, params: dict, rules: list[name_map.Rule] | None = None
) -> Iterator[tuple[str, np.ndarray]]:
  flat = flax.traverse_util.flatten_dict(params)
  text_only = config.vision is None
  scan = config.runtime.scan_layers
  for rule in name_map.rules_for(config) if rules is None else rules:
    layers = range(name_map.num_layers(config, rule)) if rule.layered else [None]
    for layer in layers:
      our_path, index = name_map.our_path(rule.ours, layer, scan)
      if our_path not in flat:
        raise CheckpointError(f"params have no {'/'.join(our_path)} (rule {rule.hf})")
      value = np.asarray(jax.device_get(flat[our_path] if index is None else flat[our_path][index]))
      hf_key = rule.hf.replace("{i}", str(layer)) if layer is not None else rule.hf
      yield name_map.export_key(hf_key, text_only), name_map.to_hf(rule.transform, value)


def save_pretrained(
  model: Llava | ModelConfig,
  params: dict,
  out_dir: str | os.PathLike,
  tokenizer: Any = None,
  processor: Any = None,
  dtype: str | None = None,
  max_shard_bytes: int = 5 * 1024**3,
) -> pathlib.Path:
  """Writes config.json + safetensors (+ tokenizer / processor files) loadable by transformers.

  dtype: the saved tensors' dtype (default: the params' dtype). Shards above max_shard_bytes
  go to model-0000k-of-0000n.safetensors with model.safetensors.index.json, as HF does.
  """
  config = model.config if isinstance(model, Llava) else model
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  first_leaf = jax.tree.leaves(params)[0]
  dtype = dtype or str(np.dtype(first_leaf.dtype))
  np_dtype = _NUMPY_DTYPES[dtype]
  (out / "config.json").write_text(json.dumps(to_hf_config(config, dtype), indent=2) + "\n")

  # Shards are written as they fill, so host memory holds at most one; their final names need
  # the count, so they are renamed at the end.
  for stale in [
    *out.glob("model*.safetensors"),
    *out.glob("tmp-shard-*.safetensors"),
    out / SAFE_INDEX,
  ]:
    stale.unlink(missing_ok=True)
  current: dict[str, np.ndarray] = {}
  current_bytes, total, num_shards = 0, 0, 1
  weight_map: dict[str, int] = {}
  tmp_name = lambda k: f"tmp-shard-{k:05d}.safetensors"
  for key, tensor in _iter_export(config, params):
    tensor = tensor.astype(np_dtype)
    if current and current_bytes + tensor.nbytes > max_shard_bytes:
      save_file(current, str(out / tmp_name(num_shards)), metadata={"format": "pt"})
      current, current_bytes, num_shards = {}, 0, num_shards + 1
    current[key] = tensor
    weight_map[key] = num_shards
    current_bytes += tensor.nbytes
    total += tensor.nbytes
  if num_shards == 1:
    save_file(current, str(out / SAFE_SINGLE), metadata={"format": "pt"})
  else:
    save_file(current, str(out / tmp_name(num_shards)), metadata={"format": "pt"})
    final = {k: f"model-{k:05d}-of-{num_shards:05d}.safetensors" for k in range(1, num_shards + 1)}
    for k, name in final.items():
      (out / tmp_name(k)).rename(out / name)
    index = {
      "metadata": {"total_size": total},
      "weight_map": {key: final[k] for key, k in weight_map.items()},
    }
    (out / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
  if tokenizer is not None:
    tokenizer.save_pretrained(str(out))
  if processor is not None:
    processor.save_pretrained(str(out))
  return out
