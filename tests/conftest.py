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


@pytest.fixture(scope="session")
def shapes_sft_policy(tmp_path_factory) -> pathlib.Path:
  """A shapes-world SFT policy trained for 2 steps and exported as an HF folder (with its
  tokenizer and processor): the starting point of the DPO, reward and PPO tests."""
  from configs import shapes_sft
  from lmm_align.trainers import export, sft

  root = tmp_path_factory.mktemp("shapes_sft")
  config = shapes_sft.get_config("runlocal")
  config.eval.enabled = False
  config.total_steps = 2
  sft.train(config, str(root / "run"))
  export.export_workdir(str(root / "run"), str(root / "hf"))
  return root / "hf"
