"""Autoregressive sampling on the KV cache: the one sampler that PPO rollouts, RLAIF-V
candidates, the critic and the benchmarks run on.

Two layers:

* `decode` is pure and jittable: one prefill forward of the left-padded prompt (images spliced
  in) writes the KV cache, then a `lax.while_loop` decodes one token per step until every row
  has emitted a stop token or reached its limit. `jit_decode` is `decode` jitted once at module
  level with the graph-changing settings static, so all callers share one compilation cache.
* `generate` is the host wrapper: it takes ragged token lists (or a padded array and its
  mask), checks the image placeholders, left-pads to a length bucket so that jit sees few
  shapes, runs `jit_decode` and returns numpy.

Token choice follows transformers' order: temperature, then top-k, then top-p (the nucleus of
`TopPLogitsWarper`), then a categorical draw; temperature 0 is greedy argmax. The logprob
recorded for each token is the raw model's (temperature 1, no filtering): that is the
behaviour policy's logprob that PPO's ratio needs, whatever warping chose the token.

Shape letters: B batch, T prompt length (a bucket), M max_new_tokens, V vocab, N images,
S cache slots = T + M, E stop ids per row.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmm_align import sharding
from lmm_align.models import anyres
from lmm_align.models.config import ModelConfig
from lmm_align.models.layers import KVCache
from lmm_align.models.llava import Llava, check_image_tokens, init_cache

Array = jax.Array

# Stop-id slots per row are padded to a multiple of this with -1 (never a token), so that
# one more or one fewer stop id does not change the compiled shape.
_STOP_ID_WIDTH = 4
# The mesh axis that data-parallel sampling splits the batch over (lmm_align.sharding.MESH_AXES).
DATA_AXIS = "data"
FSDP_AXIS = "fsdp"


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """How to pick tokens.

  temperature: 0 is greedy argmax; otherwise logits are divided by it before filtering.
  top_k: keep the k largest logits (ties with the k-th kept, as HF does); 0 turns it off.
  top_p: keep the smallest set of most probable tokens whose probability sums to >= top_p
    (at least one token); 1.0 turns it off.
  max_new_tokens: the static length of the output buffer, and the limit of every row.
  stop_token_ids: a row ends after emitting any of these (the stop token is counted in its
    length). None means the config's eos token; () means never stop early.
  """

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  max_new_tokens: int = 128
  stop_token_ids: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 is off)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 is off)")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
    if self.stop_token_ids is not None:
      object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


@flax.struct.dataclass
class SampleOutput:
  """What one call of the sampler produced (device arrays from `decode`, numpy from `generate`).

  tokens: int32[B, M], generated tokens; after a row's end (stop token included) it holds pad.
  lengths: int32[B], generated tokens per row, the stop token included.
  logprobs: float32[B, M], log-softmax of the raw model logits (temperature 1, no top-k/top-p)
    at each generated token; 0 past a row's length.
  stopped: bool[B], True where the row ended on a stop token (False: it hit its token limit).
  """

  tokens: Array
  lengths: Array
  logprobs: Array
  stopped: Array

  def token_lists(self, strip_stop: bool = True) -> list[list[int]]:
    """Each row's generated ids as a Python list; without the final stop token if strip_stop."""
    tokens, lengths, stopped = map(np.asarray, (self.tokens, self.lengths, self.stopped))
    ends = lengths - (stopped & strip_stop)
    return [row[:end].tolist() for row, end in zip(tokens, ends)]


# --------------------------------------------------------------------------------------------
# Token choice.
# --------------------------------------------------------------------------------------------


def _top_p_cutoff(descending: Array, min_tail_mass: Array) -> Array:
  """The smallest logit of the nucleus, per row: [B, K] logits sorted descending -> [B, 1].

  As `TopPLogitsWarper`: in ascending order, drop every token whose cumulative probability is
  <= 1 - top_p (min_tail_mass), but never the most probable one. The dropped tokens are a prefix
  of the ascending order, so the nucleus is everything at or above one logit value.
  """
  ascending = descending[:, ::-1]
  cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
  drop = cumulative <= min_tail_mass
  num_dropped = jnp.minimum(jnp.sum(drop, axis=-1), ascending.shape[-1] - 1)
  return jnp.take_along_axis(ascending, num_dropped[:, None], axis=-1)


def _warp(
  logits: Array, temperature: Array | float, top_k: int, min_tail_mass: Array | None
) -> Array:
  """`warp_logits` with top-p given as min_tail_mass = 1 - top_p (None is off)."""
  logits = logits.astype(jnp.float32) / temperature
  cutoff = None
  if 0 < top_k < logits.shape[-1]:
    descending = jax.lax.top_k(logits, top_k)[0]
    cutoff = descending[:, -1:]
  elif min_tail_mass is not None:
    descending = -jnp.sort(-logits, axis=-1)
  if min_tail_mass is not None:
    # The -inf tail that top-k leaves has zero mass, so the nucleus of the k survivors is the
    # nucleus of the whole top-k-filtered vocabulary: no full-vocabulary sort with top-k on.
    nucleus = _top_p_cutoff(descending, min_tail_mass)
    cutoff = nucleus if cutoff is None else jnp.maximum(cutoff, nucleus)
  if cutoff is None:
    return logits
  return jnp.where(logits >= cutoff, logits, -jnp.inf)


def warp_logits(
  logits: Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> Array:
  """HF-order logit warping: temperature, then top-k, then top-p; removed entries become -inf.

  logits: float32[B, V]; temperature > 0; top_k 0 and top_p 1.0 are off. Returns float32[B, V]
  ready for a categorical draw. Ties at a cutoff are all kept (HF keeps ties at the top-k
  cutoff too; at the top-p cutoff its choice depends on its sort order).
  """
  # 1 - top_p in float64 and then rounded, as HF compares float32 probs with a Python float.
  min_tail_mass = None if top_p >= 1.0 else jnp.float32(1.0 - top_p)
  return _warp(logits, temperature, top_k, min_tail_mass)


def _choose(
  logits: Array,
  keys: Array,
  temperature: Array,
  min_tail_mass: Array,
  *,
  greedy: bool,
  top_k: int,
  use_top_p: bool,
) -> tuple[Array, Array]:
  """logits float32[B, V], keys key[B] (one per row) -> (token int32[B], raw logprob float32[B])."""
  if greedy:
    # The max, then the first index that reaches it (jnp.argmax's tie rule): two plain
    # reductions, where argmax's (value, index) reduction took 4% of a CPU decode step.
    vocab = logits.shape[-1]
    best = jnp.max(logits, axis=-1, keepdims=True)
    token = jnp.min(jnp.where(logits == best, jnp.arange(vocab), vocab - 1), axis=-1)
  else:
    warped = _warp(logits, temperature, top_k, min_tail_mass if use_top_p else None)
    token = jax.vmap(jax.random.categorical)(keys, warped)
  token = token.astype(jnp.int32)
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  return token, jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]


# --------------------------------------------------------------------------------------------
# The pure decoding core.
# --------------------------------------------------------------------------------------------


def _lm_head(module: Llava, hidden: Array) -> Array:
  """Final hidden states [B, T, D] -> float32 logits [B, T, V] (for `apply(method=...)`)."""
  lm = module.language_model
  if lm.config.tie_word_embeddings:
    return lm.embed_tokens.attend(hidden).astype(jnp.float32)
  return lm.lm_head(hidden).astype(jnp.float32)


def unstack_layers(params: Any) -> Any:
  """Scanned params -> the unrolled model's: every `layers` subtree (a leading layer axis, in
  the decoder and in the vision tower) becomes `layers_0`, `layers_1`, ... in the same scope."""
  if not isinstance(params, dict):
    return params
  out = {}
  for key, value in params.items():
    if key == "layers":
      num_layers = jax.tree_util.tree_leaves(value)[0].shape[0]
      for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], value)
    else:
      out[key] = unstack_layers(value)
  return out


@flax.struct.dataclass
class _LoopState:
  """The while_loop carry. step: the next output slot; token: int32[B], the last chosen token;
  positions: int32[B], the RoPE position of the next input token (real tokens so far)."""

  step: Array
  token: Array
  tokens: Array
  logprobs: Array
  lengths: Array
  done: Array
  stopped: Array
  positions: Array
  cache: KVCache


# The KV cache's logical axes: rows like the activations' batch, kv heads like the k / v
# projections' heads (tensor), so a model sharded over fsdp / tensor keeps its cache sharded too.
_CACHE_KEY_AXES = ("activation_batch", "activation_kv_heads", None, None)  # [B, K, H, S]
_CACHE_VALUE_AXES = ("activation_batch", "activation_kv_heads", None, None)  # [B, K, S, H]


def shard_cache(cache: KVCache) -> KVCache:
  """The cache constrained to its logical sharding (a no-op outside a mesh context): without
  it XLA may replicate the while_loop's carry, a full copy of the cache on every device."""

  def constrain(x: Array, axes: tuple) -> Array:
    axes = (("layers",) if x.ndim == 5 else ()) + axes  # a scanned model's stacked cache
    return nn.with_logical_constraint(x, axes)

  per_layer = lambda xs, axes: (
    tuple(constrain(x, axes) for x in xs) if isinstance(xs, tuple) else constrain(xs, axes)
  )
  return cache.replace(
    key=per_layer(cache.key, _CACHE_KEY_AXES), value=per_layer(cache.value, _CACHE_VALUE_AXES)
  )


def decode(
  params: dict,
  input_ids: Array,
  attention_mask: Array,
  pixel_values: Array | None,
  row_keys: Array,
  stop_token_ids: Array,
  row_max_new_tokens: Array,
  temperature: Array,
  min_tail_mass: Array,
  pad_id: Array,
  pack_plan: dict | None = None,
  *,
  config: ModelConfig,
  max_new_tokens: int,
  greedy: bool,
  top_k: int,
  use_top_p: bool,
  unroll_layers: bool = True,
) -> SampleOutput:
  """Prefill a left-padded prompt, then decode up to `max_new_tokens` in a `lax.while_loop`.

  input_ids, attention_mask: int32[B, T], left-padded (all rows end at slot T - 1).
  pixel_values: float32[N, H, W, 3] (or [B, I, H, W, 3]) or None; placeholders must match
    (checked by the caller: inside jit the count cannot raise).
  row_keys: key[B], one PRNG key per row (`row_keys`); step t of a row draws with
    fold_in(its key, t), so a row's samples do not depend on the rest of the batch or on how
    the batch is split over devices. Unused when greedy.
  stop_token_ids: int32[B, E], each row's stop ids, padded with -1.
  row_max_new_tokens: int32[B], each row's limit (<= max_new_tokens).
  temperature, min_tail_mass (= 1 - top_p), pad_id: scalars, traced so they do not recompile.
  pack_plan: anyres (LLaVA-NeXT / OneVision) with tiled pixel_values [B, tiles, H, W, 3]: the
    rows' `anyres.pack_plan(...).as_arrays()` (arrays [B, L, ...]), else None.
  Static: config, max_new_tokens, greedy, top_k, use_top_p (what changes the graph), and
  unroll_layers: decode with the layers unrolled. Under `nn.scan` every step slices each
  layer's weights (and cache) out of the stacked arrays and XLA:CPU materialises those slices,
  about one copy of the decoder weights per token; unrolled, the weights are sliced once per
  call, before the loop, into one buffer per layer (the bench's 4M model: 2.3x faster per call
  on CPU, for one extra copy of the weights). The prompt is prefilled by the unrolled model too,
  so the cache is one buffer per layer from the start (images spliced in as usual). The
  cache (S = T + M slots) is allocated here, inside jit, so XLA owns it and the loop updates it
  in place; no buffer crosses the call boundary that donation could save.
  """
  if unroll_layers and config.runtime.scan_layers:
    # Prefill unrolled too: from a scanned prefill the stacked cache would be copied into one
    # buffer per layer, two whole caches alive at once (PPO's 512-row rollout on v5p-16: 50 GiB
    # a chip each).
    config = config.with_runtime(scan_layers=False)
    params = unstack_layers(params)
  model = Llava(config)
  variables = {"params": params}
  batch, prompt_length = input_ids.shape
  choose = functools.partial(_choose, greedy=greedy, top_k=top_k, use_top_p=use_top_p)

  cache = init_cache(config, batch, prompt_length + max_new_tokens)
  prefill = model.apply(
    variables, input_ids, pixel_values, attention_mask, cache=cache, with_logits=False,
    pack_plan=pack_plan,
  )  # fmt: skip
  # Left padding puts every row's last prompt token at T - 1: only that row of logits is needed.
  logits = model.apply(variables, prefill.hidden_states[:, -1:], method=_lm_head)[:, 0]

  # Decode steps feed one real token per row; rows that are done feed pad, and what they see
  # no longer matters.
  step_mask = jnp.ones((batch, 1), jnp.int32)

  def record(state: _LoopState, logits: Array) -> _LoopState:
    """Choose the token of `state.step` for every live row and fold it into the state."""
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, state.step)
    token, logprob = choose(logits, step_keys, temperature, min_tail_mass)
    live = ~state.done & (state.step < row_max_new_tokens)
    token = jnp.where(live, token, pad_id)
    logprob = jnp.where(live, logprob, 0.0)
    hit_stop = live & jnp.any(token[:, None] == stop_token_ids, axis=-1)
    return state.replace(
      step=state.step + 1,
      token=token,
      tokens=jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step)),
      logprobs=jax.lax.dynamic_update_slice(state.logprobs, logprob[:, None], (0, state.step)),
      lengths=state.lengths + live.astype(jnp.int32),
      done=state.done | hit_stop | (state.step + 1 >= row_max_new_tokens),
      stopped=state.stopped | hit_stop,
    )

  def cond(state: _LoopState) -> Array:
    return (state.step < max_new_tokens) & ~jnp.all(state.done)

  def body(state: _LoopState) -> _LoopState:
    out = model.apply(
      variables, state.token[:, None], None, step_mask, state.positions[:, None], state.cache
    )
    state = state.replace(cache=shard_cache(out.cache), positions=state.positions + 1)
    return record(state, out.logits[:, 0])

  state = _LoopState(
    step=jnp.zeros((), jnp.int32),
    token=jnp.zeros((batch,), jnp.int32),
    tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
    logprobs=jnp.zeros((batch, max_new_tokens), jnp.float32),
    lengths=jnp.zeros((batch,), jnp.int32),
    done=jnp.zeros((batch,), bool),
    stopped=jnp.zeros((batch,), bool),
    # Positions count each row's real tokens, as the model's default does; carrying them
    # skips a reduction over the cache's valid mask every step.
    positions=jnp.sum(attention_mask, axis=-1, dtype=jnp.int32),
    cache=shard_cache(prefill.cache),
  )
  state = jax.lax.while_loop(cond, body, record(state, logits))
  return SampleOutput(
    tokens=state.tokens, lengths=state.lengths, logprobs=state.logprobs, stopped=state.stopped
  )


jit_decode = jax.jit(
  decode,
  static_argnames=("config", "max_new_tokens", "greedy", "top_k", "use_top_p", "unroll_layers"),
)


def row_keys(rng: Array, num_rows: int) -> Array:
  """key[num_rows]: row i samples with fold_in(rng, i), whatever the batch size."""
  return jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(num_rows, dtype=jnp.uint32))


def _without_mesh_axis(rules: Sequence[tuple[str, Any]], axis: str) -> tuple[tuple[str, Any], ...]:
  """The logical axis rules with one mesh axis dropped (it is manual inside shard_map)."""
  out = []
  for name, target in rules:
    if isinstance(target, (tuple, list)):
      target = tuple(t for t in target if t != axis) or None
    elif target == axis:
      target = None
    out.append((name, target))
  return tuple(out)


@functools.cache
def _data_parallel_decode(mesh: Mesh, **static: Any) -> Callable[..., SampleOutput]:
  """`decode` under shard_map, manual over the mesh's `data` axis only.

  Each data-parallel group decodes its own rows and leaves its loop when they are done: no
  all-reduce of the done flags per token, as one batch-sharded while_loop would need. The other
  mesh axes stay automatic, so params keep their fsdp / tensor sharding inside a group.
  """

  def per_group(*args):
    rules = _without_mesh_axis(nn.get_logical_axis_rules(), DATA_AXIS)
    with nn.logical_axis_rules(rules):
      return decode(*args, **static)

  rows, same = PartitionSpec(DATA_AXIS), PartitionSpec()
  in_specs = (same, rows, rows, rows, rows, rows, rows, same, same, same, rows)
  return jax.jit(
    jax.shard_map(
      per_group, mesh=mesh, in_specs=in_specs, out_specs=rows, axis_names={DATA_AXIS},
      check_vma=False,
    )
  )  # fmt: skip


@functools.cache
def _model_sharded_decode(mesh: Mesh, **static: Any) -> Callable[..., SampleOutput]:
  """`decode` jitted over the whole mesh with automatic partitioning: params keep their fsdp /
  tensor sharding, the KV cache follows the rules (`shard_cache`), the rows are split over data
  x fsdp (`generate` places them so). One loop for the whole batch: it runs until every row is
  done (the done flags are all-reduced each step). For models too large to replicate per data
  group when fsdp and tensor are both > 1, where `_data_parallel_decode`'s partly manual
  shard_map cannot go."""
  rows = NamedSharding(mesh, PartitionSpec((DATA_AXIS, FSDP_AXIS)))
  return jax.jit(functools.partial(decode, **static), out_shardings=rows)


def _keys_on_mesh(keys: Array, placement: NamedSharding) -> Array:
  """Row keys (typed, or raw uint32[B, 2]) placed like `sharding.from_host`, through their key
  data."""
  if not jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
    return sharding.from_host(np.asarray(keys), placement)
  data = sharding.from_host(np.asarray(jax.random.key_data(keys)), placement)
  return jax.random.wrap_key_data(data, impl=jax.random.key_impl(keys))


def _to_host(x: Array) -> np.ndarray:
  """A (writable) numpy copy of every row on this process's host. Over a mesh that spans
  several processes the rows sit on other hosts' devices: they are all-gathered first."""
  if x.is_fully_addressable:
    # np.array copies: device_get may hand back read-only views of the device buffers.
    return np.array(jax.device_get(x))
  return np.array(multihost_utils.process_allgather(x, tiled=True))


# --------------------------------------------------------------------------------------------
# Host side: ragged prompts -> bucketed, left-padded batch -> numpy results.
# --------------------------------------------------------------------------------------------


def bucket_length(n: int, buckets: Sequence[int] | None = None) -> int:
  """The smallest bucket >= n. Default buckets: 16, 32, 64, ... (powers of two from 16)."""
  if n < 1:
    raise ValueError(f"prompt length {n} must be >= 1")
  if buckets is None:
    return max(16, 1 << (n - 1).bit_length())
  fits = [b for b in buckets if b >= n]
  if not fits:
    raise ValueError(f"prompt length {n} exceeds the largest bucket {max(buckets)}")
  return min(fits)


def left_pad(
  prompts: Sequence[Sequence[int]], length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
  """Ragged token lists -> (input_ids, attention_mask) int32[B, length], padded on the left."""
  ids = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for row, prompt in enumerate(prompts):
    if len(prompt):
      ids[row, length - len(prompt) :] = prompt
      mask[row, length - len(prompt) :] = 1
  return ids, mask


def _stop_id_matrix(
  settings: SamplingSettings,
  config: ModelConfig,
  batch: int,
  per_row: Sequence[Sequence[int]] | None,
) -> np.ndarray:
  if per_row is None:
    default = settings.stop_token_ids
    if default is None:
      default = () if config.text.eos_token_id is None else (config.text.eos_token_id,)
    per_row = [default] * batch
  if len(per_row) != batch:
    raise ValueError(f"row_stop_token_ids has {len(per_row)} rows for a batch of {batch}")
  width = max(1, max(len(ids) for ids in per_row))
  width = -(-width // _STOP_ID_WIDTH) * _STOP_ID_WIDTH
  out = np.full((batch, width), -1, np.int32)
  for row, ids in enumerate(per_row):
    out[row, : len(ids)] = list(ids)
  return out


def _tiled_pack_plan(
  config: ModelConfig,
  input_ids: np.ndarray,
  pixel_values,
  image_sizes,
  buckets: Sequence[int] | None,
) -> dict | None:
  """Anyres with tiled pixel_values [B, tiles, H, W, 3]: the rows' pack plan as arrays, its
  token budget L bucketed like prompt lengths; checks the placeholders and the tile counts."""
  tiled = config.anyres and pixel_values is not None and np.ndim(pixel_values) == 5
  if not tiled:
    if image_sizes is not None:
      raise ValueError(
        "image_sizes are for an anyres config (image_grid_pinpoints) with tiled pixel_values "
        "[B, tiles, H, W, 3]"
      )
    return None
  b, tiles = pixel_values.shape[:2]
  if image_sizes is None:
    raise ValueError("tiled pixel_values [B, tiles, H, W, 3] need image_sizes [B, 2]")
  sizes = [tuple(int(x) for x in hw) for hw in np.asarray(image_sizes).reshape(-1, 2)]
  if b != len(input_ids) or len(sizes) != b:
    raise ValueError(
      f"tiled pixel_values {tuple(pixel_values.shape)} and image_sizes ({len(sizes)} rows) "
      f"must have one row per prompt ({len(input_ids)})"
    )
  for row, size in enumerate(sizes):
    if min(size) > 0 and anyres.num_tiles(size, config.packing) > tiles:
      raise ValueError(
        f"row {row}: an image of size {size} needs {anyres.num_tiles(size, config.packing)} "
        f"tiles, pixel_values hold {tiles}"
      )
  counts = [config.image_tokens(size) if min(size) > 0 else 0 for size in sizes]
  per_row = np.sum(input_ids == config.image_token_id, axis=1)
  if per_row.tolist() != counts:
    raise ValueError(
      f"image placeholders per row {per_row.tolist()} differ from the tokens the images pack "
      f"into {counts} (ModelConfig.image_tokens of each image_sizes row)"
    )
  budget = bucket_length(max(max(counts), 1), buckets)
  return anyres.pack_plan(sizes, config.packing, max_tokens=budget).as_arrays()


def _check_images(config: ModelConfig, input_ids: np.ndarray, pixel_values) -> None:
  """The host-side placeholder check that jit cannot do, for both pixel_values layouts."""
  if config.anyres and pixel_values is not None and np.ndim(pixel_values) == 5:
    return  # tiled: checked by _tiled_pack_plan
  if pixel_values is None or not config.has_vision:
    if pixel_values is not None:
      raise ValueError("pixel_values given to a text-only model")
    if config.has_vision:
      check_image_tokens(config, input_ids, 0)
    return
  if pixel_values.ndim == 4:
    check_image_tokens(config, input_ids, pixel_values.shape[0])
    return
  # Row-aligned [B, I, H, W, 3]: each row holds whole images, at most I of them.
  per_row = np.sum(input_ids == config.image_token_id, axis=1)
  slots = pixel_values.shape[1]
  if (
    pixel_values.shape[0] != len(input_ids)
    or np.any(per_row % config.num_image_tokens)
    or np.any(per_row > slots * config.num_image_tokens)
  ):
    raise ValueError(
      f"image placeholders per row {per_row.tolist()} must be whole images of "
      f"{config.num_image_tokens} tokens, at most {slots} per row, for pixel_values {pixel_values.shape}"
    )


def _row_aligned_images(
  config: ModelConfig, input_ids: np.ndarray, pixel_values: np.ndarray | Array
) -> np.ndarray:
  """Placeholder-ordered images [N, H, W, 3] -> row-aligned slots [B, I, H, W, 3] (zeros in
  unused slots), so that the batch can be split by rows."""
  pixel_values = np.asarray(pixel_values, np.float32)
  if pixel_values.ndim == 5:
    return pixel_values
  per_row = np.sum(input_ids == config.image_token_id, axis=1) // config.num_image_tokens
  out = np.zeros((len(input_ids), max(1, per_row.max()), *pixel_values.shape[1:]), np.float32)
  starts = np.concatenate([[0], np.cumsum(per_row)])
  for row, count in enumerate(per_row):
    out[row, :count] = pixel_values[starts[row] : starts[row] + count]
  return out


def generate(
  model_or_config: Llava | ModelConfig,
  params: dict,
  prompts: Sequence[Sequence[int]] | np.ndarray,
  pixel_values: np.ndarray | Array | None = None,
  *,
  settings: SamplingSettings,
  rng: Array | None,
  pad_id: int | None = None,
  attention_mask: np.ndarray | None = None,
  buckets: Sequence[int] | None = None,
  row_max_new_tokens: Sequence[int] | np.ndarray | None = None,
  row_stop_token_ids: Sequence[Sequence[int]] | None = None,
  unroll_layers: bool = True,
  mesh: Mesh | None = None,
  image_sizes: np.ndarray | Sequence[tuple[int, int]] | None = None,
) -> SampleOutput:
  """Sample continuations of a batch of prompts; returns a SampleOutput of numpy arrays.

  prompts: B token-id lists of any lengths, or an int[B, T] array with `attention_mask` [B, T]
    (either padding side; real tokens are taken where the mask is 1). Image placeholders must
    already be expanded (config.num_image_tokens per image).
  pixel_values: float32[N, H, W, 3], the batch's images in placeholder order, or
    float32[B, I, H, W, 3] row-aligned image slots (unused slots ignored), or None. For an
    anyres config (LLaVA-NeXT / OneVision), [B, tiles, H, W, 3] is one tiled image per row
    (base tile first) with `image_sizes`, and [N, H, W, 3] single-tile images.
  image_sizes: anyres only, int[B, 2] (height, width) of each row's image, (0, 0) for a row
    without one; the row's placeholders must be `config.image_tokens(size)`. The packing plan's
    token budget is bucketed like the prompt length, so jit sees few shapes.
  rng: a PRNG key (may be None when greedy). The same key gives the same samples; row i draws
    with `row_keys(rng, B)[i]`.
  pad_id: the id written after a row ends and used for left padding; default config's pad or 0.
  buckets: prompt length buckets (default powers of two from 16): prompts are left-padded to
    the bucket, so jit compiles once per (bucket, batch size, image count, static settings).
  row_max_new_tokens: optional int[B] per-row limits (each <= settings.max_new_tokens).
  row_stop_token_ids: optional per-row stop ids, replacing settings.stop_token_ids.
  unroll_layers: see `decode` (faster steps for one extra copy of the decoder weights).
  mesh: decode over this mesh. With fsdp or tensor of size 1, data-parallel over its `data`
    axis (`_data_parallel_decode`, params sharded over the other axis); with both > 1, model-
    sharded over the whole mesh (`_model_sharded_decode`: params and KV cache sharded over
    fsdp / tensor, rows over data x fsdp), for models one group cannot hold. The batch is split
    by rows, topped up to whole groups with copies of the last row that generate nothing. The
    output is the same as on one device: each row's draws depend only on its key (`row_keys`).
    The mesh may span several processes (a multi-host slice): every process then calls
    generate with the same arguments, places only its own devices' rows, and gets every row
    back (all-gathered), the same output in each process.

  Use `output.token_lists(strip_stop=True)` for Python lists of each row's tokens (the stop
  token dropped, or kept with strip_stop=False).
  """
  config = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
  if pad_id is None:
    pad_id = config.text.pad_token_id if config.text.pad_token_id is not None else 0
  if attention_mask is not None:
    ids, real = np.asarray(prompts), np.asarray(attention_mask).astype(bool)
    prompts = [row[keep].tolist() for row, keep in zip(ids, real)]
  prompts = [list(p) for p in prompts]
  batch = len(prompts)
  input_ids, mask = left_pad(prompts, bucket_length(max(len(p) for p in prompts), buckets), pad_id)
  _check_images(config, input_ids, pixel_values)
  plan = _tiled_pack_plan(config, input_ids, pixel_values, image_sizes, buckets)

  max_new = settings.max_new_tokens
  limits = (
    np.full((batch,), max_new, np.int32)
    if row_max_new_tokens is None
    else np.asarray(row_max_new_tokens, np.int32)
  )
  if limits.shape != (batch,) or limits.max() > max_new or limits.min() < 0:
    raise ValueError(f"row_max_new_tokens must be int[{batch}] in [0, {max_new}], got {limits}")
  if rng is None:
    if not settings.greedy:
      raise ValueError("sampling (temperature > 0) needs an rng key")
    rng = jax.random.key(0)
  stop_ids = _stop_id_matrix(settings, config, batch, row_stop_token_ids)
  static = dict(
    config=config,
    max_new_tokens=max_new,
    greedy=settings.greedy,
    top_k=settings.top_k,
    use_top_p=settings.top_p < 1.0,
    unroll_layers=unroll_layers,
  )
  # XLA's SPMD partitioner (jaxlib 0.10.2) aborts the process on the embedding gather inside a
  # partly manual shard_map when fsdp and tensor both shard the embedding: such a mesh
  # samples with the automatic partitioner instead (`_model_sharded_decode`).
  model_sharded = mesh is not None and mesh.shape[FSDP_AXIS] > 1 and mesh.shape["tensor"] > 1
  if model_sharded:
    groups = mesh.shape[DATA_AXIS] * mesh.shape[FSDP_AXIS]
  else:
    groups = 1 if mesh is None else mesh.shape[DATA_AXIS]
  if groups == 1:
    run = functools.partial(jit_decode, **static)
    row_spec = PartitionSpec()  # on a mesh: every row on every device
  else:
    run = (_model_sharded_decode if model_sharded else _data_parallel_decode)(mesh, **static)
    row_spec = PartitionSpec((DATA_AXIS, FSDP_AXIS) if model_sharded else DATA_AXIS)
    # Top up to whole groups with copies of the last row that stop at once (limit 0).
    take = np.concatenate([np.arange(batch), np.full(-batch % groups, batch - 1)])
    if pixel_values is not None:
      pixel_values = _row_aligned_images(config, input_ids, pixel_values)[take]
    input_ids, mask, stop_ids = input_ids[take], mask[take], stop_ids[take]
    if plan is not None:
      plan = {k: v[take] for k, v in plan.items()}
    limits = np.concatenate([limits, np.zeros(len(take) - batch, np.int32)])
  keys = row_keys(rng, len(input_ids))
  scalars = [
    np.asarray(settings.temperature if not settings.greedy else 1.0, np.float32),
    np.asarray(1.0 - settings.top_p, np.float32),
    np.asarray(pad_id, np.int32),
  ]
  if pixel_values is not None:
    to_float = jnp.asarray if mesh is None else np.asarray  # a device array stays on device
    pixel_values = to_float(pixel_values, np.float32)
  if mesh is None:
    rows, same, keys_rows = jnp.asarray, jnp.asarray, lambda x: x
  else:
    # Global arrays built from the host rows, which every process holds in full (each calls
    # generate with the same prompts): a mesh over several hosts samples as one process does.
    rows = functools.partial(sharding.from_host, placement=NamedSharding(mesh, row_spec))
    same = functools.partial(sharding.from_host, placement=NamedSharding(mesh, PartitionSpec()))
    keys_rows = functools.partial(_keys_on_mesh, placement=NamedSharding(mesh, row_spec))
  output = run(
    params,
    rows(input_ids),
    rows(mask),
    None if pixel_values is None else rows(pixel_values),
    keys_rows(keys),
    rows(stop_ids),
    rows(limits),
    *map(same, scalars),
    None if plan is None else {k: rows(np.asarray(v)) for k, v in plan.items()},
  )
  return jax.tree_util.tree_map(lambda x: _to_host(x)[:batch], output)
