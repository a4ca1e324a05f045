"""Evaluations by kind: what a run reports on its model, chosen by `config.eval.kind`.

  metrics = registry.evaluate(config, workdir, params)     # a trainer's final params
  metrics = registry.evaluate_model(config, loaded)        # an HF folder (the iterative loop)
  lmm-align eval KIND --model=HF_DIR [--workdir=RUN]       # the same, as a report

An evaluation is a function `fn(config, loaded) -> metrics` registered with `@register(kind)`:
`loaded` is an `inference.LoadedModel` (model, params, tokenizer, image config, template) and
the metrics (flat, JSON-ready) go into the run's summary.json. "none" evaluates nothing ({}),
and so does `config.eval.enabled=False` (the trainers' switch). Plugins (`lmm_align.plugins`)
register kinds: the shapes world registers "shapes" (held-out scenes). Built in: "pope"
(`evals.kinds`: POPE question files, for a loop on real data).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from lmm_align import plugins, sharding
from lmm_align.inference import LoadedModel

NONE = "none"
# Built-in kinds, imported the first time a name is asked for (see `get`).
BUILTIN = {"pope": "lmm_align.evals.kinds"}

EvalFn = Callable[[ml_collections.ConfigDict, LoadedModel], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """A registered kind. The fields after `run` serve `lmm-align eval KIND`'s report."""

  kind: str
  run: EvalFn
  default_config: str = ""  # the config file (repo-relative) read when no --workdir is given
  main_metrics: tuple[str, ...] = ()  # the report's bar plot
  limit_field: str = ""  # the config field `--limit` sets (the evaluation's size)
  seed_field: str = ""  # the config field `--eval_seed` sets
  # metrics["examples"] -> the report's examples ({"image": ..., text columns ...}).
  report_examples: Callable[[ml_collections.ConfigDict, list[dict]], list[dict]] | None = None


_EVALUATIONS: dict[str, Evaluation] = {}


def register(kind: str, **report: Any) -> Callable[[EvalFn], EvalFn]:
  """Decorator: registers `fn(config, loaded) -> metrics` as evaluation `kind`; keywords fill
  the other `Evaluation` fields."""
  if kind == NONE:
    raise ValueError(f"eval.kind {NONE!r} means no evaluation; it cannot be registered")

  def decorate(fn: EvalFn) -> EvalFn:
    if kind in _EVALUATIONS and _EVALUATIONS[kind].run is not fn:
      raise ValueError(f"evaluation kind {kind!r} is already registered")
    _EVALUATIONS[kind] = Evaluation(kind, fn, **report)
    return fn

  return decorate


def kinds() -> tuple[str, ...]:
  """The registered kinds, the built-in and plugins' included."""
  for module in set(BUILTIN.values()):
    importlib.import_module(module)
  plugins.load()
  return tuple(sorted(_EVALUATIONS))


def get(kind: str) -> Evaluation:
  if kind not in _EVALUATIONS and kind in BUILTIN:
    importlib.import_module(BUILTIN[kind])
  if kind not in _EVALUATIONS:
    plugins.load()
  if kind not in _EVALUATIONS:
    raise ValueError(f"eval.kind={kind!r} is not registered: use one of {(NONE, *kinds())}")
  return _EVALUATIONS[kind]


def active_kind(config: ml_collections.ConfigDict) -> str:
  """config.eval.kind, or "none" when `eval.enabled` is False."""
  if not config.eval.get("enabled", True):
    return NONE
  kind = config.eval.get("kind")
  if not kind:
    raise ValueError(f"config.eval.kind is not set: use one of {(NONE, *kinds())}")
  return kind


def evaluate_model(config: ml_collections.ConfigDict, loaded: LoadedModel) -> dict[str, Any]:
  """The configured evaluation of a loaded model ({} for "none")."""
  kind = active_kind(config)
  return {} if kind == NONE else get(kind).run(config, loaded)


def evaluate(config: ml_collections.ConfigDict, workdir: str, params: Any) -> dict[str, Any]:
  """The configured evaluation of a trainer's final (merged, full) params, with the run's
  tokenizer, model config and image preprocessing ({} for "none")."""
  kind = active_kind(config)
  if kind == NONE:
    return {}
  evaluation = get(kind)  # an unknown kind fails before the params are gathered
  from lmm_align import run_config
  from lmm_align.data import sources
  from lmm_align.models.llava import Llava

  tokenizer = sources.tokenizer_for(config, workdir)
  model = Llava(run_config.model_config_for(config, tokenizer).with_runtime(lora=None))
  if jax.process_count() > 1:
    # Params sharded across hosts cannot be read by one host: gather full copies (every host
    # then runs the small evaluation on its own device; process 0 writes the summary).
    from jax.experimental import multihost_utils

    params = multihost_utils.process_allgather(params, tiled=True)
  else:
    params = jax.device_get(params)  # off the training mesh, onto the evaluation device
  image_config = sources.image_config_for(config, model.config)
  loaded = LoadedModel(model, params, tokenizer, image_config, config.data.template, workdir)
  # Evaluate on this process's first device, outside the training mesh: the sampler's
  # outputs must be readable by this host.
  local = sharding.make_mesh((1, 1, 1), jax.local_devices()[:1])
  with sharding.activation_sharding(local, tuple(tuple(r) for r in config.mesh.rules)):
    return evaluation.run(config, loaded)
