"""Evaluations by kind: an unknown kind is named with the registered ones, "none" and
eval.enabled=False evaluate nothing, a plugin's kind is found, and a registered kind's metrics
reach a trainer's final params with the run's model, tokenizer and image preprocessing."""

from __future__ import annotations

import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs.shapes import sft as shapes_sft
from lmm_align import main, plugins
from lmm_align.evals import registry


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch):
  """Kinds registered by a test stay in that test (the built-in plugins' are there first)."""
  plugins.load()
  monkeypatch.setattr(registry, "_EVALUATIONS", dict(registry._EVALUATIONS))


def _eval_config(**fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"eval": {"enabled": True, **fields}})


def test_unknown_kind_is_named_with_the_registered_ones():
  config = _eval_config(kind="nope")
  with pytest.raises(ValueError, match=r"eval.kind='nope' is not registered: use one of "
                     r"\('none', .*'shapes'"):  # fmt: skip
    registry.evaluate(config, "/no/workdir", params=None)
  with pytest.raises(ValueError, match="eval.kind='nope'"):
    registry.evaluate_model(config, loaded=None)
  with pytest.raises(ValueError, match="config.eval.kind is not set"):
    registry.evaluate_model(_eval_config(), loaded=None)


def test_none_and_disabled_evaluate_nothing():
  assert registry.evaluate(_eval_config(kind="none"), "/no/workdir", params=None) == {}
  assert registry.evaluate_model(_eval_config(kind="none"), loaded=None) == {}
  # Disabled: the kind is not even looked up.
  assert registry.evaluate(_eval_config(kind="nope", enabled=False), "/w", params=None) == {}
  assert registry.active_kind(_eval_config(kind="shapes", enabled=False)) == "none"


def test_registering_none_or_a_kind_twice_is_an_error():
  with pytest.raises(ValueError, match="'none' means no evaluation"):
    registry.register("none")(lambda config, loaded: {})
  registry.register("twice")(lambda config, loaded: {})
  with pytest.raises(ValueError, match="'twice' is already registered"):
    registry.register("twice")(lambda config, loaded: {})


def test_a_plugin_registers_a_kind(tmp_path, monkeypatch):
  (tmp_path / "my_eval_plugin.py").write_text(
    "from lmm_align.evals import registry\n"
    "@registry.register('my_eval')\n"
    "def run(config, loaded):\n"
    "  return {'answer': loaded * config.eval.scale}\n"
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setenv(plugins.ENV_VAR, "my_eval_plugin")
  assert registry.evaluate_model(_eval_config(kind="my_eval", scale=3), loaded=14) == {"answer": 42}
  assert "my_eval" in registry.kinds() and "shapes" in registry.kinds()
  sys.modules.pop("my_eval_plugin", None)


def test_a_trainers_final_params_reach_the_kind_with_the_runs_model(tmp_path):
  """`evaluate(config, workdir, params)`, as a trainer calls it: the kind gets the params as
  given (on the host), the run's model, its workdir tokenizer and the data template."""
  import flax.linen as nn

  from lmm_align import run_config
  from lmm_align.data import sources
  from lmm_align.models.llava import Llava, dummy_inputs

  @registry.register("fingerprint")
  def fingerprint(config, loaded):
    leaves = jax.tree.leaves(loaded.params)
    return {
      "on_host": all(isinstance(x, np.ndarray) for x in leaves),
      "param_sum": float(sum(np.sum(x, dtype=np.float64) for x in leaves)),
      "vocab": len(loaded.tokenizer),
      "template": loaded.template,
      "crop": list(loaded.image_config.crop_size),
    }

  config = shapes_sft.get_config("runlocal")
  config = main.apply_overrides(config, {"eval.enabled": True, "eval.kind": "fingerprint"})
  tokenizer = sources.tokenizer_for(config, str(tmp_path))  # the run's, saved in its workdir
  model = Llava(run_config.model_config_for(config, tokenizer))
  shapes = jax.eval_shape(
    lambda: nn.unbox(model.init(jax.random.key(0), *dummy_inputs(model.config)))
  )
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes["params"])
  expected = float(sum(np.sum(x, dtype=np.float64) for x in jax.tree.leaves(params)))
  params_on_device = jax.device_put(params)
  metrics = registry.evaluate(config, str(tmp_path), params_on_device)
  side = model.config.vision.image_size
  assert metrics == {"on_host": True, "param_sum": pytest.approx(expected, rel=1e-12),
                     "vocab": len(tokenizer), "template": config.data.template,
                     "crop": [side, side]}  # fmt: skip
