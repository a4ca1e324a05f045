"""Plugins: packages that register data sources, evaluations, rewards or trainers by name.

The registries (`data.registry`, `evals.registry`, `rl.rewards`, `trainers.registry`) call
`load()` before they look a name up, so a plugin's names resolve wherever a config uses them,
and no general module imports a plugin: this module is the one place that names them.

  PLUGINS                the built-in ones: the shapes world (`lmm_align.shapes`);
  $LMM_ALIGN_PLUGINS     more, as comma-separated module names (a user's own formats).

A plugin is a module whose import registers its names (`@registry.register(...)`).
"""

from __future__ import annotations

import importlib
import os

PLUGINS = ("lmm_align.shapes",)
ENV_VAR = "LMM_ALIGN_PLUGINS"

_loaded: set[str] = set()


def names() -> tuple[str, ...]:
  """The plugin modules `load` imports: the built-in ones, then $LMM_ALIGN_PLUGINS's."""
  extra = [m.strip() for m in os.environ.get(ENV_VAR, "").split(",") if m.strip()]
  return tuple(dict.fromkeys([*PLUGINS, *extra]))


def load() -> None:
  """Imports every plugin once (a no-op after the first call for the same list). A plugin that
  fails to import raises, naming it and where it was listed."""
  for module in names():
    if module in _loaded:
      continue
    try:
      importlib.import_module(module)
    except ImportError as e:
      where = "lmm_align.plugins.PLUGINS" if module in PLUGINS else f"${ENV_VAR}"
      raise ImportError(f"plugin {module!r} (listed in {where}) failed to import: {e}") from e
    _loaded.add(module)
