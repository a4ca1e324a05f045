"""Test setup: a fake 8-device CPU platform, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import atexit  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# Most of the suite's time is XLA compiling the same tiny programs again: every train() call
# builds fresh jitted closures, which the in-memory cache never matches, and the sharded,
# restarted and resumed runs repeat a run just compiled. A persistent cache per test process
# (each xdist worker; the subprocesses a test starts inherit it) compiles each program once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="lmm_align_xla_cache_")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

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
  from configs.shapes import sft as shapes_sft
  from lmm_align.trainers import export, sft

  root = tmp_path_factory.mktemp("shapes_sft")
  config = shapes_sft.get_config("runlocal")
  config.eval.enabled = False
  config.total_steps = 2
  sft.train(config, str(root / "run"))
  export.export_workdir(str(root / "run"), str(root / "hf"))
  return root / "hf"


# The modules that take longest (`pytest --durations=40`, summed per module, 2026-12-07), run
# first. With --dist loadfile each module runs whole on one worker, in collection order
# (--no-loadscope-reorder), so starting the long ones first keeps one worker from finishing a
# long module alone at the end while the other idles.
SLOWEST_MODULES = (
  "tests/trainers/test_sft.py",
  "tests/trainers/test_ppo.py",
  "tests/trainers/test_iterative.py",
  "tests/models/test_llava.py",
  "tests/trainers/test_multiprocess.py",
  "tests/trainers/test_dpo.py",
  "tests/test_main.py",
  "tests/models/test_lora.py",
)


def pytest_collection_modifyitems(config, items):
  rank = {module: i for i, module in enumerate(SLOWEST_MODULES)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
