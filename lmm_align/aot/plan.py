"""`lmm-align plan`: every jitted program of a run, compiled ahead of time for a Cloud TPU slice.

  lmm-align plan --config=configs/llava15/sft.py --topology=v5p-64 [--mesh=1,-1,1] \
      [--config.model.remat_policy=full ...] [--save=plan.json]
  lmm-align plan --config=configs/llava_rlhf/ppo.py:model=7b --topology=v5p-16
  lmm-align plan --config=configs/shapes/dpo.py:runlocal --topology=cpu-8 --mesh=2,2,2

`--topology` is a Cloud TPU accelerator type (`v4-32`, `v5p-64`, `v5litepod-16` or `v5e-16`,
`v6e-8`): compile-only TPU devices of that slice come from libtpu
(`jax.experimental.topologies`, no TPU needed; `pip install -e '.[tpu]'`), and the TPU
compiler itself places every buffer. `cpu-N` uses N fake CPU devices (XLA:CPU's buffer
assignment, an estimate; for tests without libtpu). `--mesh` defaults to the config's
`mesh.sizes` (an iterative loop's: its DPO config's).

Nothing is materialised: the run's params, optimizer state, batches and RNG key are
`ShapeDtypeStruct`s carrying the shardings the trainer gives them (abstract `eval_shape` of
the model's init, the config's logical rules), traced under the slice's abstract mesh, and each
program is jitted exactly as its trainer jits it (the trainers' public step functions,
`state.jit_train_step`, the state donated; the programs are in programs.py and rl_programs.py).
Per program and per chip the table has the compiler's argument, output, alias, temp and
generated-code bytes, the peak (argument + output - alias + temp), the run's other buffers
alive beside it (by hand: e.g. PPO's frozen bases during a rollout forward), their sum against
the chip's HBM, the compile time, and the compiler's cost estimates (FLOPs, bytes accessed,
its step-time estimate where it gives one) against the model's own FLOPs; for a decode step
also its bytes against the least it must read (weights + KV cache once). The last line is
`plan: fits ...` (exit 0) or `plan: does not fit ...` (exit 3, also when the compiler reports
RESOURCE_EXHAUSTED); its peak_gib is the largest peak + resident.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from lmm_align import config_files, sharding
from lmm_align.aot import programs as programs_lib
from lmm_align.aot import rl_programs
from lmm_align.aot.abstract import GIB, Program, bytes_per_chip, model_config_of

EXIT_DOES_NOT_FIT = 3
EXIT_BAD_INPUT = 2

# --------------------------------------------------------------------------------------------
# Accelerators.
# --------------------------------------------------------------------------------------------

# Cloud TPU docs, "TPU versions" / system architecture pages (cloud.google.com/tpu/docs/v4,
# v5p, v5e, v6e): HBM per chip, peak bf16 FLOP/s per chip, HBM bandwidth per chip, and the
# accelerator types' topologies. v4 and v5p accelerator types count TensorCores (2 per chip:
# v5p-64 is 32 chips, one megacore device each); v5e and v6e count chips.
# (generation, HBM GiB, peak bf16 FLOP/s, HBM bytes/s, compile-only chip config)
GENERATIONS = {
  "v4": (32.0, 275e12, 1200e9, "megacore"),
  "v5p": (95.0, 459e12, 2765e9, "megacore"),
  "v5e": (16.0, 197e12, 819e9, "default"),
  "v6e": (32.0, 918e12, 1640e9, "default"),
}
_CUBE_TOPOLOGIES = {  # TensorCores in the accelerator type -> chips x, y, z
  8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8",
  512: "4x8x8", 1024: "8x8x8", 2048: "8x8x16", 4096: "8x16x16",
}  # fmt: skip
_PLANE_TOPOLOGIES = {  # chips in the accelerator type -> chips x, y
  1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """A slice: `topology` names libtpu's compile-only layout ("v5p:2x4x4"); cpu-N has none."""

  name: str
  generation: str  # "v4", "v5p", "v5e", "v6e" or "cpu"
  topology: str
  chips: int
  hbm_gib: float
  peak_flops: float | None  # bf16 FLOP/s per chip
  hbm_bandwidth: float | None  # bytes/s per chip


def accelerator_types() -> dict[str, Accelerator]:
  """Every known accelerator type by name (v5e-N is an alias of v5litepod-N)."""
  out = {}
  for gen in ("v4", "v5p"):
    hbm, flops, bw, _ = GENERATIONS[gen]
    for cores, shape in _CUBE_TOPOLOGIES.items():
      out[f"{gen}-{cores}"] = Accelerator(
        f"{gen}-{cores}", gen, f"{gen}:{shape}", cores // 2, hbm, flops, bw
      )
  for gen, prefixes in (("v5e", ("v5litepod", "v5e")), ("v6e", ("v6e",))):
    hbm, flops, bw, _ = GENERATIONS[gen]
    for chips, shape in _PLANE_TOPOLOGIES.items():
      for prefix in prefixes:
        name = f"{prefix}-{chips}"
        out[name] = Accelerator(name, gen, f"{gen}:{shape}", chips, hbm, flops, bw)
  return out


def resolve_accelerator(name: str) -> Accelerator:
  """An accelerator type, or `cpu-N` (N fake CPU devices, each given 1/N of the host's RAM)."""
  if match := re.fullmatch(r"cpu-(\d+)", name):
    n = int(match.group(1))
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return Accelerator(name, "cpu", "", n, host / max(n, 1), None, None)
  known = accelerator_types()
  if name not in known:
    raise ValueError(
      f"--topology={name!r} is not a known accelerator type; use cpu-N or one of "
      f"{', '.join(sorted(known, key=lambda k: (k.split('-')[0], int(k.split('-')[1]))))}"
    )
  return known[name]


def devices_for(acc: Accelerator) -> list:
  """The slice's devices: compile-only TPU devices from libtpu, or the first N CPU devices."""
  if acc.generation == "cpu":
    devices = jax.devices("cpu")
    if len(devices) < acc.chips:
      raise ValueError(
        f"--topology={acc.name} needs {acc.chips} CPU devices but JAX has {len(devices)}: set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={acc.chips} before JAX starts"
      )
    return devices[: acc.chips]
  from jax.experimental import topologies

  # libtpu reads these when it starts; on a machine without a TPU they only quiet its warnings.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", acc.name)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Compile-only devices touch no TPU, so two plans (or a plan beside a test) may load libtpu
  # at once; without this the second stops at libtpu's process lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  shape = acc.topology.split(":")[1]
  host_bounds = (1, 1, 1) if shape == "1x1" else (2, 2, 1)
  try:
    desc = topologies.get_topology_desc(
      platform="tpu",
      topology_name=acc.topology,
      chip_config_name=GENERATIONS[acc.generation][3],
      chips_per_host_bounds=host_bounds,
    )
  except Exception as e:  # no libtpu (ImportError / RuntimeError), or a libtpu without this chip
    raise RuntimeError(
      f"--topology={acc.name}: no compile-only TPU devices ({type(e).__name__}: {e}); the TPU "
      "compiler comes with `pip install -e '.[tpu]'` (libtpu)"
    ) from e
  if len(desc.devices) != acc.chips:
    raise RuntimeError(f"{acc.topology} gave {len(desc.devices)} devices, not {acc.chips} chips")
  return list(desc.devices)


def parse_mesh(text: str) -> tuple[int, ...]:
  try:
    sizes = tuple(int(s) for s in text.split(","))
  except ValueError:
    sizes = ()
  if len(sizes) != 3 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"--mesh={text!r}: give data,fsdp,tensor sizes, e.g. 1,-1,1")
  return sizes


def mesh_for(acc: Accelerator, sizes: Sequence[int], devices: list) -> Mesh:
  try:
    return sharding.make_mesh(sizes, devices)
  except ValueError as e:
    raise ValueError(f"--mesh={','.join(map(str, sizes))} on {acc.name}: {e}") from e


# config.trainer -> the programs its run compiles (each built under the slice's abstract mesh).
PROGRAMS: dict[str, Callable[..., list[Program]]] = {
  "sft": programs_lib.sft_programs,
  "dpo": programs_lib.dpo_programs,
  "reward": programs_lib.reward_programs,
  "ppo": rl_programs.ppo_programs,
  "iterative": rl_programs.iterative_programs,
}


# --------------------------------------------------------------------------------------------
# Compile and report.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Measured:
  """One program's numbers per chip (bytes; FLOPs and bytes accessed from cost_analysis)."""

  name: str
  compile_seconds: float = 0.0
  argument: int = 0
  output: int = 0
  alias: int = 0
  temp: int = 0
  generated_code: int = 0
  peak: int = 0
  by_hand: dict[str, int] = dataclasses.field(default_factory=dict)
  flops: float | None = None
  bytes_accessed: float | None = None
  optimal_seconds: float | None = None
  cost_pass: str = ""
  cost_loops: int = 0  # while loops left in the costed program (each costed once)
  model_flops_per_chip: float = 0.0
  resource_exhausted: str = ""
  # The run's other live buffers beside this program, by hand (Program.resident).
  resident: dict[str, int] = dataclasses.field(default_factory=dict)
  minimal_bytes: int = 0  # a decode step's weights + KV cache, per chip (0: not a decode step)

  @property
  def total(self) -> int:
    """What the chip holds while the program runs: its peak and the run's other buffers."""
    return self.peak + sum(self.resident.values())


def _progress(message: str) -> None:
  """A line on stderr as each compile ends (a 7B program takes minutes); stdout is the table."""
  print(f"[plan] {message} (host max RSS {_max_rss_gib():.2f} GiB)", file=sys.stderr, flush=True)


def _compile(program: Program) -> tuple[Any, float]:
  # JAX's caches keep every traced and compiled program; a plan compiles each once, and a 7B
  # program's leftovers are about a GB of host memory (the PPO plan's grew past 9 GB).
  jax.clear_caches()
  t0 = time.perf_counter()
  compiled = program.jitted.lower(*program.args).compile()
  return compiled, time.perf_counter() - t0


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # older JAX: one dict per program
    cost = cost[0] if cost else {}
  return dict(cost or {})


def _set_cost(row: Measured, compiled, cost_pass: str) -> None:
  cost = _cost(compiled)
  row.flops, row.bytes_accessed = cost.get("flops"), cost.get("bytes accessed")
  row.optimal_seconds = cost.get("optimal_seconds")
  row.cost_pass = cost_pass
  # A loop the compiler kept or made (a scan, a windowed einsum over a sharded axis) has its
  # body costed once: counting them says how far to trust the FLOPs.
  row.cost_loops = len(re.findall(r"\swhile\(", compiled.as_text()))


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": GIB, "T": 1024**4}


def _exhausted_peak(message: str) -> int:
  """The bytes a RESOURCE_EXHAUSTED message says the program needs ("Used 120.5G of 95.7G
  hbm", "memory required for HLO temporaries (54.34G) exceeds available HBM"), else 0."""
  for pattern in (r"Used ([\d.]+)([KMGT]?)i?B? of", r"required [^(]*\(([\d.]+)([KMGT]?)i?B?\)"):
    if match := re.search(pattern, message):
      return int(float(match.group(1)) * _UNITS[match.group(2)])
  return 0


def measure(program: Program, chips: int) -> Measured:
  """Compiles one program and reads its memory and cost analyses; a RESOURCE_EXHAUSTED
  compile is an answer (recorded), not an error."""
  row = Measured(program.name, model_flops_per_chip=program.model_flops / chips)
  row.by_hand = {k: bytes_per_chip(v) for k, v in program.by_hand.items()}
  row.resident = {k: bytes_per_chip(v) for k, v in program.resident.items()}
  row.minimal_bytes = program.minimal_bytes
  t0 = time.perf_counter()
  try:
    compiled, row.compile_seconds = _compile(program)
  except Exception as e:  # the TPU compiler raises XlaRuntimeError with the status in the text
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    row.compile_seconds = time.perf_counter() - t0
    row.resource_exhausted = str(e).strip().splitlines()[0][:400]
    row.peak = _exhausted_peak(str(e))
    if "temporaries" in str(e):  # its figure leaves out the arguments: add those counted by hand
      row.peak += sum(row.by_hand.values())
    return row
  stats = compiled.memory_analysis()
  row.argument = stats.argument_size_in_bytes
  row.output = stats.output_size_in_bytes
  row.alias = stats.alias_size_in_bytes
  row.temp = stats.temp_size_in_bytes
  row.generated_code = stats.generated_code_size_in_bytes
  row.peak = row.argument + row.output - row.alias + row.temp
  _set_cost(row, compiled, "as compiled")
  _progress(f"{row.name}: compiled in {row.compile_seconds:.1f} s, peak {format_gib(row.peak)} GiB")
  return row


def add_unrolled_cost(rows: list[Measured], programs: list[Program], chips: int) -> None:
  """FLOPs and bytes from the cost pass (the same programs with scan_layers off and one micro-
  batch, compiled only for their cost): the compiler costs a loop's body once, not per trip."""
  for row, program in zip(rows, programs, strict=True):
    if row.resource_exhausted:
      continue
    try:
      compiled, _ = _compile(program)
    except Exception as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      row.cost_pass = "cost pass ran out of memory: costs of the scanned program"
      continue
    _set_cost(row, compiled, "unrolled (scan_layers off, one micro-batch)")
    _progress(f"{row.name}: cost pass compiled")


def format_gib(num_bytes: float) -> str:
  """Two decimals, or enough digits that a tiny model's peak does not print as 0.00."""
  gib = num_bytes / GIB
  return f"{gib:.2f}" if gib >= 0.1 or gib == 0 else f"{gib:.6f}"


def report(row: Measured, acc: Accelerator, hbm: float) -> list[str]:
  """The program's table, per chip."""
  lines = [f"== {row.name}  (compile {row.compile_seconds:.1f} s)"]
  if row.resource_exhausted:
    lines.append(f"  RESOURCE_EXHAUSTED from the compiler: {row.resource_exhausted}")
  else:
    for label in ("argument", "output", "alias", "temp", "generated_code"):
      value = getattr(row, label)
      lines.append(f"  {label.replace('_', ' '):40s} {value / GIB:10.3f} GiB {value:16d} bytes")
  for label, value in row.by_hand.items():
    lines.append(f"  {label + ' by hand':40s} {value / GIB:10.3f} GiB {value:16d} bytes")
  peak_label = "peak = argument + output - alias + temp"
  if row.resource_exhausted:
    peak_label = "peak, from the compiler's error (at least)"
  lines.append(f"  {peak_label:40s} {row.peak / GIB:10.3f} GiB {row.peak:16d} bytes")
  for label, value in row.resident.items():
    lines.append(
      f"  {'resident beside it: ' + label:40s} {value / GIB:10.3f} GiB {value:16d} bytes"
    )
  if row.resident:
    total_label = "peak + resident (by hand)"
    lines.append(f"  {total_label:40s} {row.total / GIB:10.3f} GiB {row.total:16d} bytes")
  headroom = hbm * GIB - row.total
  lines.append(
    f"  HBM {hbm:.2f} GiB, headroom {headroom / GIB:.3f} GiB ({100 * headroom / (hbm * GIB):.1f}%)"
  )
  if row.flops is not None:
    ratio = row.flops / row.model_flops_per_chip if row.model_flops_per_chip else float("nan")
    lines.append(
      f"  compiler estimates ({row.cost_pass}): {row.flops:.4g} FLOPs, "
      f"{row.bytes_accessed or 0:.4g} bytes accessed per chip"
    )
    lines.append(
      f"  model FLOPs {row.model_flops_per_chip:.4g} per chip; compiled / model = {ratio:.3f}; "
      f"{row.cost_loops} while loop(s) in the costed program"
      if row.model_flops_per_chip
      else f"  no model pass (no model FLOPs); {row.cost_loops} while loop(s)"
    )
    if row.minimal_bytes:
      lines.append(
        f"  decode bytes / minimal bytes = {(row.bytes_accessed or 0) / row.minimal_bytes:.3f} "
        f"(minimal: weights + KV cache read once, {row.minimal_bytes / GIB:.3f} GiB per chip)"
      )
    lower_bound = ratio < 0.9
    if lower_bound:
      lines.append(
        "  note: fewer compiled FLOPs than the model's own: loops left in the program (above) "
        "are costed once per loop, not per trip, so FLOPs, bytes and times here are lower bounds"
      )
    times = []
    if row.optimal_seconds and row.optimal_seconds > 0:  # the compiler gives < 0 for some loops
      times.append(f"the compiler's optimal_seconds {row.optimal_seconds:.4g} s")
    if acc.peak_flops and acc.hbm_bandwidth and not lower_bound:
      bound = max(row.flops / acc.peak_flops, (row.bytes_accessed or 0) / acc.hbm_bandwidth)
      mfu = row.model_flops_per_chip / acc.peak_flops / bound if bound else 0.0
      times.append(f"roofline {bound:.4g} s (model FLOP utilisation {100 * mfu:.1f}% there)")
    if times:
      lines.append("  step time estimate: " + "; ".join(times))
  return lines


def plan(
  config: ml_collections.ConfigDict,
  acc: Accelerator,
  mesh_sizes: Sequence[int] | None = None,
  hbm_gib: float = 0.0,
  cost_pass: str = "unrolled",
  only: Sequence[str] = (),
) -> tuple[bool, dict[str, Any], list[str]]:
  """(fits, the JSON table, printed lines) for the config's run on the slice; the mesh is
  `mesh_sizes`, else the config's (an iterative loop's: its DPO config's). `only`: plan just
  the programs so named (a run's heaviest program alone, on a small host)."""
  if config.trainer not in PROGRAMS:
    raise ValueError(f"config.trainer={config.trainer!r}: plan knows {sorted(PROGRAMS)}")
  trained = rl_programs.config_for_model(config)  # the model, batch and mesh of the run
  model_config, notes = model_config_of(trained)
  devices = devices_for(acc)
  mesh = mesh_for(acc, tuple(mesh_sizes or trained.mesh.sizes), devices)
  rules = tuple(tuple(r) for r in trained.mesh.rules)
  hbm = hbm_gib or acc.hbm_gib
  kind = devices[0].device_kind
  r = model_config.runtime
  lines = [
    f"plan for {acc.name} ({acc.chips} chips, {kind}, {hbm:.2f} GiB HBM per chip), mesh "
    f"(data, fsdp, tensor) = {tuple(mesh.shape.values())}; trainer {config.trainer}",
    f"model: {r.dtype} compute, {r.param_dtype} params, remat {r.remat_policy}, scan "
    f"{r.scan_layers}, LoRA {r.lora is not None}; batch {trained.batch_size} x "
    f"{trained.data.max_length} tokens, grad_accum {trained.optim.grad_accum_steps}",
    *(f"note: {n}" for n in notes),
    "All memory and cost figures are the compiler's estimates, per chip"
    + (" (XLA:CPU on fake devices, not the TPU compiler)." if acc.generation == "cpu" else "."),
  ]
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(list(rules)):
    programs = _selected(PROGRAMS[config.trainer](config, model_config, mesh, rules), only)
    rows = []
    for program in programs:
      rows.append(measure(program, acc.chips))
      # The table so far on stderr: a plan stopped halfway (minutes per 7B program) keeps it.
      print("\n".join(report(rows[-1], acc, hbm)), file=sys.stderr, flush=True)
    looped = r.scan_layers or trained.optim.grad_accum_steps > 1
    if cost_pass == "unrolled" and looped:
      unrolled = config.copy_and_resolve_references()
      rl_programs.config_for_model(unrolled).optim.grad_accum_steps = 1
      flat_model = model_config.with_runtime(scan_layers=False)
      flat = PROGRAMS[config.trainer](unrolled, flat_model, mesh, rules)
      add_unrolled_cost(rows, _selected(flat, only), acc.chips)
  if looped:
    lines.append(
      "The compiler costs a loop (the scanned layers, gradient accumulation) once, not per trip: "
      + {
        "unrolled": "FLOPs and bytes come from a cost pass compiled with scan_layers off and one "
        "micro-batch (same global batch).",
        "scanned": "the FLOPs and bytes below count one layer of the stack (--cost=scanned).",
        "none": "no cost pass (--cost=none).",
      }[cost_pass]
    )
  if cost_pass == "none":
    for row in rows:
      row.flops = None
  for row in rows:
    lines += report(row, acc, hbm)
  peak = max(row.total for row in rows)
  fits = all(row.total <= hbm * GIB and not row.resource_exhausted for row in rows)
  lines.append(f"host max RSS {_max_rss_gib():.2f} GiB")
  table = {
    "accelerator": dataclasses.asdict(acc),
    "device_kind": kind,
    "hbm_gib": hbm,
    "mesh": dict(mesh.shape),
    "trainer": config.trainer,
    "programs": [dataclasses.asdict(row) for row in rows],
    "peak_gib": peak / GIB,
    "fits": fits,
  }
  verdict = "fits" if fits else "does not fit"
  lines.append(f"plan: {verdict} peak_gib={format_gib(peak)} hbm_gib={hbm:.2f} device={kind}")
  return fits, table, lines


def _selected(programs: list[Program], only: Sequence[str]) -> list[Program]:
  if not only:
    return programs
  unknown = sorted(set(only) - {p.name for p in programs})
  if unknown:
    raise ValueError(f"--programs: {unknown} not among {[p.name for p in programs]}")
  return [p for p in programs if p.name in only]


def _max_rss_gib() -> float:
  import resource

  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def save_table(table: dict[str, Any], path: str) -> None:
  """The plan's JSON (`--save`): the accelerator, mesh and every program's row."""
  with open(path, "w") as f:
    json.dump(table, f, indent=2, default=str)


def prepare_platforms(acc: Accelerator) -> None:
  """Before JAX's backends start: enough fake CPU devices for cpu-N, and the CPU platform
  (compile-only TPU devices need no TPU backend, and this machine may have no TPU)."""
  try:
    if acc.generation == "cpu":
      if "device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", acc.chips)
    elif not os.environ.get("JAX_PLATFORMS"):
      jax.config.update("jax_platforms", "cpu")
  except RuntimeError:  # the backends already started: keep what they have
    pass


def main(argv: list[str]) -> int:
  """`lmm-align plan` with its flags (argv without the program name); returns the exit status:
  0 fits, 3 does not fit, 2 bad input."""
  from absl import flags
  from ml_collections import config_flags

  for arg in argv:
    if arg.startswith("--config="):
      config_files.make_config_package_importable(arg.split("=", 1)[1].split(":", 1)[0])
  fv = flags.FlagValues()
  argv = ["lmm-align plan", *argv]
  # sys_argv: the --config.x=y override flags are defined from the command line being parsed.
  config_flags.DEFINE_config_file(
    "config", None, "configs/X.py[:arg]", flag_values=fv, lock_config=True, sys_argv=argv
  )
  flags.DEFINE_string("topology", None, "accelerator type (v5p-64, v5e-16, ...) or cpu-N", flag_values=fv)  # fmt: skip
  flags.DEFINE_string("mesh", None, "data,fsdp,tensor sizes (one may be -1); default: the config's", flag_values=fv)  # fmt: skip
  flags.DEFINE_string("save", None, "write the table as JSON here", flag_values=fv)
  flags.DEFINE_float("hbm_gib", 0.0, "HBM per chip (default: the accelerator's)", flag_values=fv)
  flags.DEFINE_list("programs", [], "plan only these programs (names)", flag_values=fv)
  flags.DEFINE_enum(
    "cost", "unrolled", ["unrolled", "scanned", "none"], "how loops are costed", flag_values=fv
  )
  try:
    fv(argv)
    if fv.config is None or not fv.topology:
      raise ValueError("--config and --topology are required")
    acc = resolve_accelerator(fv.topology)
    sizes = parse_mesh(fv.mesh) if fv.mesh else None
    prepare_platforms(acc)
    fits, table, lines = plan(fv.config, acc, sizes, fv.hbm_gib, fv.cost, fv.programs)
  except (flags.Error, ValueError, RuntimeError) as e:
    print(f"plan: error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  print("\n".join(lines), flush=True)
  if fv.save:
    save_table(table, fv.save)
  return 0 if fits else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
