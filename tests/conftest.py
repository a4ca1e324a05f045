"""Test setup: a fake 8-device CPU platform, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_reference_data() -> pathlib.Path:
  """../shared/reference_data, or a clean skip where a fresh clone lacks it."""
  path = SHARED_DIR / "reference_data"
  if not path.is_dir():
    pytest.skip("../shared/reference_data is not present (fresh clone)")
  return path
