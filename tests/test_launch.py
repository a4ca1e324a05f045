"""launch/tpu_run.sh against a fake `gcloud` on PATH: dry-run output, create / reuse / recreate,
queued resources, argument quoting down to the trainer's argv, usage errors, and shellcheck.

The fake gcloud logs each call's argv as a JSON line and answers `describe` from a state file
(absent or empty: exit 1, "not found"). With FAKE_GCLOUD_HOME set it also plays the one worker:
`scp` copies into that directory and `ssh --command` runs the command there in bash, so the
remote install and run strings are executed for real against a fake venv. No network."""

import json
import os
import pathlib
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "launch" / "tpu_run.sh"
BASE = ["--name", "node", "--zone", "us-central2-b", "--accelerator", "v4-32"]
TRAINER_ARGS = [
  "--config=configs/llava15/sft.py:model=7b",
  "--workdir=gs://bucket/runs/sft 7b",
  "--config.optim.lr=2e-5",
  "--config.note=hello world",
  "it's",
  'say "hi"',
  "$HOME",
  "a;b|c&d",
]

FAKE_GCLOUD = """#!{python}
import json, os, pathlib, shutil, subprocess, sys

args = sys.argv[1:]
root = pathlib.Path(os.environ["FAKE_GCLOUD_DIR"])
with open(root / "calls.jsonl", "a") as f:
  f.write(json.dumps(args) + "\\n")
group, verb = args[2], args[3]  # compute tpus {{tpu-vm,queued-resources}} VERB
state = root / (group + ".state")
if not state.exists():  # first call: the initial state, "" meaning it does not exist
  state.write_text(os.environ.get("FAKE_STATE_" + group.replace("-", "_").upper(), ""))
if verb == "describe":
  states = state.read_text().split(",")  # "A,B": each describe moves one step along
  if not states[0]:
    sys.exit("ERROR: (gcloud) NOT_FOUND")
  print(states[0])
  state.write_text(",".join(states[1:] or states))
elif verb == "create":
  state.write_text("ACTIVE" if group == "queued-resources" else "READY")
elif verb == "delete":
  state.write_text("")
home = os.environ.get("FAKE_GCLOUD_HOME")
if verb == "scp" and home:
  shutil.copy(args[4], pathlib.Path(home) / args[5].split(":", 1)[1])
if verb == "ssh" and home:
  command = args[args.index("--command") + 1]
  sys.exit(subprocess.run(["bash", "-c", command], env={{**os.environ, "HOME": home}}).returncode)
if verb == "ssh" and "python -m lmm_align.main" in args[-1]:
  sys.exit(int(os.environ.get("FAKE_RUN_RC", "0")))
"""

# The worker's venv: pip and python record their argv (and python a few env vars) as JSON lines.
FAKE_PYTHON = """#!{python}
import json, os, pathlib, sys, time

home = pathlib.Path(os.environ["HOME"])
with open(home / (pathlib.Path(sys.argv[0]).name + "_calls.jsonl"), "a") as f:
  f.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(),
                      "TPU_STDERR_LOG_LEVEL": os.environ.get("TPU_STDERR_LOG_LEVEL")}}) + "\\n")
if pathlib.Path(sys.argv[0]).name == "python":
  print("trainer says hello")
  time.sleep(float(os.environ.get("FAKE_TRAINER_SLEEP", "0")))
  sys.exit(int(os.environ.get("FAKE_TRAINER_RC", "0")))
"""


def _write_executable(path: pathlib.Path, text: str) -> None:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake(tmp_path, monkeypatch):
  """A PATH with the fake gcloud first; returns a helper namespace."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _write_executable(bin_dir / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
  env = {k: v for k, v in os.environ.items() if not k.startswith(("FAKE_", "TPU_", "XLA_"))}
  env.update(
    PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
    FAKE_GCLOUD_DIR=str(tmp_path),
    TPU_RUN_POLL_SECONDS="0",
  )

  class Fake:
    dir = tmp_path

    @staticmethod
    def run(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
      return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env={**env, **extra_env},
        capture_output=True,
        text=True,
        timeout=60,
      )

    @staticmethod
    def calls() -> list[list[str]]:
      log = tmp_path / "calls.jsonl"
      return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

  return Fake


def _verbs(calls: list[list[str]]) -> list[str]:
  """['tpu-vm describe', 'tpu-vm create', ...] for calls of the form `compute tpus GROUP VERB`."""
  return [f"{c[2]} {c[3]}" for c in calls]


def _trainer_argv(remote_command: str) -> list[str]:
  """The words a shell passes to `python -m lmm_align.main` in the remote run command."""
  words = shlex.split(remote_command)
  start = words.index("lmm_align.main") + 1
  end = min(i for i, w in enumerate(words) if i > start and w in ("&", ">>"))
  return words[start:end]


def _dry_run_commands(stdout: str) -> list[list[str]]:
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


# ---------------------------------------------------------------------------- usage


def test_help_prints_usage(fake):
  result = fake.run("--help")
  assert result.returncode == 0
  assert result.stdout.startswith("Usage: tpu_run.sh --name NAME --zone ZONE --accelerator TYPE")


@pytest.mark.parametrize(
  "args",
  [
    ["--zone", "z", "--accelerator", "v4-8", "--", "--workdir=gs://b/r"],
    ["--name", "n", "--accelerator", "v4-8", "--", "--workdir=gs://b/r"],
    ["--name", "n", "--zone", "z", "--", "--workdir=gs://b/r"],
    BASE,
    [*BASE, "--"],
    [*BASE, "--bogus", "--", "--workdir=gs://b/r"],
    [*BASE, "--", "--config=configs/x.py", "--workdir=/tmp/local"],
    [*BASE, "--", "--config=configs/x.py"],
    ["--name", "n", "--zone", "z", "--accelerator", "tpu7-8", "--", "--workdir=gs://b/r"],
    [*BASE, "--detach", "--delete-after", "--", "--workdir=gs://b/r"],
    ["--name"],
  ],
  ids=[
    "no-name",
    "no-zone",
    "no-accelerator",
    "no-separator",
    "no-args",
    "unknown-option",
    "local-workdir",
    "no-workdir",
    "unknown-family",
    "detach-and-delete",
    "name-without-value",
  ],
)
def test_bad_arguments_exit_2_with_usage(fake, args):
  result = fake.run(*args)
  assert result.returncode == 2, result.stderr
  assert "Usage: tpu_run.sh" in result.stderr
  assert fake.calls() == []


# ---------------------------------------------------------------------------- dry run


def test_dry_run_prints_every_gcloud_command_and_calls_none(fake):
  result = fake.run(*BASE, "--project", "proj", "--dry-run", "--delete-after", "--", *TRAINER_ARGS)
  assert result.returncode == 0, result.stderr
  assert fake.calls() == []
  commands = _dry_run_commands(result.stdout)
  assert all(c[0] == "gcloud" and c[-2:] != ["--project"] and "proj" in c for c in commands)
  assert [c[3:5] for c in commands] == [
    ["tpu-vm", "describe"],
    ["tpu-vm", "create"],
    ["tpu-vm", "scp"],
    ["tpu-vm", "ssh"],
    ["tpu-vm", "ssh"],
    ["tpu-vm", "delete"],
  ]
  describe, create, scp, install, run, delete = commands
  assert create == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "create",
    "node",
    "--zone",
    "us-central2-b",
    "--project",
    "proj",
    "--accelerator-type",
    "v4-32",
    "--version",
    "tpu-ubuntu2204-base",
  ]
  assert scp[5:7] == [scp[5], "node:lmm_align.tar.gz"] and "--worker=all" in scp
  for ssh in (install, run):
    assert ssh[5] == "node" and "--worker=all" in ssh and ssh[-2] == "--command"
  assert 'pip" install --quiet -e . "jax[tpu]"' in install[-1]
  assert "python -m lmm_align.main" in run[-1]
  assert _trainer_argv(run[-1]) == TRAINER_ARGS
  assert delete[-1] == "--quiet"


@pytest.mark.parametrize(
  "accelerator,runtime",
  [
    ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-64", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
  ],
)
def test_default_runtime_by_family(fake, accelerator, runtime):
  result = fake.run(
    "--name",
    "n",
    "--zone",
    "z",
    "--accelerator",
    accelerator,
    "--spot",
    "--dry-run",
    "--",
    "--workdir=gs://b/r",
  )
  create = _dry_run_commands(result.stdout)[1]
  assert create[-3:] == ["--version", runtime, "--spot"]


def test_explicit_version_wins(fake):
  result = fake.run(*BASE, "--version=my-runtime", "--dry-run", "--", "--workdir=gs://b/r")
  assert _dry_run_commands(result.stdout)[1][-2:] == ["--version", "my-runtime"]


def test_dry_run_queued_uses_queued_resources(fake):
  result = fake.run(
    *BASE, "--queued", "--spot", "--dry-run", "--delete-after", "--", "--workdir=gs://b/r"
  )
  assert result.returncode == 0, result.stderr
  commands = _dry_run_commands(result.stdout)
  assert commands[1] == [
    "gcloud",
    "compute",
    "tpus",
    "queued-resources",
    "create",
    "node-qr",
    "--node-id",
    "node",
    "--zone",
    "us-central2-b",
    "--accelerator-type",
    "v4-32",
    "--runtime-version",
    "tpu-ubuntu2204-base",
    "--spot",
  ]
  assert (
    commands[-1][3:6] == ["queued-resources", "delete", "node-qr"] and "--force" in commands[-1]
  )
  assert not any(c[3:5] == ["tpu-vm", "create"] for c in commands)


# ---------------------------------------------------------------------------- against fake gcloud


def test_creates_the_tpu_when_describe_fails(fake):
  result = fake.run(*BASE, "--", *TRAINER_ARGS)
  assert result.returncode == 0, result.stderr
  calls = fake.calls()
  assert _verbs(calls) == [
    "tpu-vm describe",
    "tpu-vm create",
    "tpu-vm scp",
    "tpu-vm ssh",
    "tpu-vm ssh",
  ]
  assert calls[1][-4:] == ["--accelerator-type", "v4-32", "--version", "tpu-ubuntu2204-base"]
  run_command = calls[-1][-1]
  assert "python -m lmm_align.main" in run_command
  assert _trainer_argv(run_command) == TRAINER_ARGS
  assert pathlib.Path(calls[2][4]).name == "lmm_align.tar.gz"


def test_reuses_a_ready_tpu(fake):
  result = fake.run(*BASE, "--", *TRAINER_ARGS, FAKE_STATE_TPU_VM="READY")
  assert result.returncode == 0, result.stderr
  assert _verbs(fake.calls()) == ["tpu-vm describe", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]
  assert "reusing it" in result.stdout


def test_recreates_a_preempted_tpu(fake):
  result = fake.run(*BASE, "--spot", "--", *TRAINER_ARGS, FAKE_STATE_TPU_VM="PREEMPTED")
  assert result.returncode == 0, result.stderr
  calls = fake.calls()
  assert _verbs(calls)[:3] == ["tpu-vm describe", "tpu-vm delete", "tpu-vm create"]
  assert calls[2][-1] == "--spot"


def test_queued_waits_until_active_then_runs(fake):
  result = fake.run(
    *BASE,
    "--queued",
    "--",
    *TRAINER_ARGS,
    FAKE_STATE_QUEUED_RESOURCES="WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE",
  )
  assert result.returncode == 0, result.stderr
  assert _verbs(fake.calls()) == ["queued-resources describe"] * 3 + [
    "tpu-vm scp",
    "tpu-vm ssh",
    "tpu-vm ssh",
  ]


def test_queued_creates_when_missing(fake):
  result = fake.run(*BASE, "--queued", "--delete-after", "--", *TRAINER_ARGS)
  assert result.returncode == 0, result.stderr
  calls = fake.calls()
  assert _verbs(calls) == [
    "queued-resources describe",
    "queued-resources create",
    "queued-resources describe",
    "tpu-vm scp",
    "tpu-vm ssh",
    "tpu-vm ssh",
    "queued-resources delete",
  ]
  assert calls[1][3:7] == ["create", "node-qr", "--node-id", "node"]


def test_failed_run_still_deletes_and_keeps_its_status(fake):
  result = fake.run(*BASE, "--delete-after", "--", *TRAINER_ARGS, FAKE_RUN_RC="3")
  assert result.returncode == 3
  assert _verbs(fake.calls())[-1] == "tpu-vm delete"


# ---------------------------------------------------------------------------- on a fake worker


@pytest.fixture
def worker(fake, tmp_path):
  """A worker home with a pre-made venv whose pip and python only record their calls."""
  home = tmp_path / "worker"
  venv_bin = home / "lmm_align_venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "activate").write_text(f'PATH="{venv_bin}:$PATH"\n')
  for name in ("python", "pip"):
    _write_executable(venv_bin / name, FAKE_PYTHON.format(python=sys.executable))
  return home


def _read_jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_end_to_end_on_a_fake_worker(fake, worker):
  result = fake.run(
    *BASE, "--", *TRAINER_ARGS, FAKE_GCLOUD_HOME=str(worker), TPU_STDERR_LOG_LEVEL="0"
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert (worker / "lmm_align" / "launch" / "tpu_run.sh").is_file()  # the checkout was unpacked
  [pip] = _read_jsonl(worker / "pip_calls.jsonl")
  assert pip["argv"] == ["install", "--quiet", "-e", ".", "jax[tpu]"]
  [trainer] = _read_jsonl(worker / "python_calls.jsonl")
  assert trainer["argv"] == ["-m", "lmm_align.main", *TRAINER_ARGS]
  assert trainer["cwd"] == str(worker / "lmm_align")
  assert trainer["TPU_STDERR_LOG_LEVEL"] == "0"
  [log] = (worker / "lmm_align_logs").glob("main-*.log")
  assert "trainer says hello" in log.read_text() and "trainer says hello" in result.stdout


def test_trainer_failure_is_the_exit_status(fake, worker):
  result = fake.run(*BASE, "--", *TRAINER_ARGS, FAKE_GCLOUD_HOME=str(worker), FAKE_TRAINER_RC="5")
  assert result.returncode == 5
  assert not (worker / "lmm_align_logs" / "main.pid").exists()


def test_detach_returns_and_blocks_a_second_launch(fake, worker):
  env = dict(FAKE_GCLOUD_HOME=str(worker), FAKE_TRAINER_SLEEP="30")
  result = fake.run(*BASE, "--detach", "--", *TRAINER_ARGS, **env)
  assert result.returncode == 0, result.stdout + result.stderr
  pid = int((worker / "lmm_align_logs" / "main.pid").read_text())
  try:
    assert "started pid" in result.stdout
    again = fake.run(*BASE, "--", *TRAINER_ARGS, **env)
    assert again.returncode != 0 and "still running" in again.stderr
    deadline = time.time() + 5
    while not (worker / "python_calls.jsonl").exists() and time.time() < deadline:
      time.sleep(0.05)
    [trainer] = _read_jsonl(worker / "python_calls.jsonl")
    assert trainer["argv"] == ["-m", "lmm_align.main", *TRAINER_ARGS]
  finally:
    os.kill(pid, signal.SIGTERM)


# ---------------------------------------------------------------------------- lint


def test_shellcheck_is_clean():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
  result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout
