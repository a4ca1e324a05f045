"""Loading experiment configs (`configs/X.py[:arg]`) from any working directory.

Config files do `from configs import common`, so the folder that holds `configs/` must be on
sys.path; absl's config flag (lmm_align.main) and the benchmark scripts both go through here.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import ml_collections


def make_config_package_importable(config_path: str) -> None:
  """Puts the folder holding the config file's `configs/` package on sys.path: the parent of
  the nearest enclosing folder named `configs` (configs/X.py and configs/shapes/X.py alike),
  else the parent of the file's folder."""
  folder = os.path.dirname(os.path.abspath(config_path))
  root = os.path.dirname(folder)
  probe = folder
  while os.path.dirname(probe) != probe:
    if os.path.basename(probe) == "configs":
      root = os.path.dirname(probe)
      break
    probe = os.path.dirname(probe)
  if root not in sys.path:
    sys.path.insert(0, root)


def load_config(spec: str, repo_root: str | None = None) -> ml_collections.ConfigDict:
  """'configs/X.py[:arg]' -> get_config(arg). A relative path that does not exist from the
  working directory is looked up under `repo_root`."""
  path, _, arg = spec.partition(":")
  if not os.path.isabs(path) and not os.path.exists(path) and repo_root is not None:
    path = os.path.join(repo_root, path)
  make_config_package_importable(path)
  name = "_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
