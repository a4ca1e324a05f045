"""`lmm-align plan`: every jitted program of a run, compiled ahead of time for a Cloud TPU slice.

  plan.py         the accelerator table, compile and report, the CLI (`main`)
  abstract.py     abstract params, optimizer state and batches; the model's own FLOPs
  programs.py     the SFT, DPO and reward-model programs
  rl_programs.py  the PPO and iterative-loop programs, and the KV-cached sampler's

`from lmm_align import aot` gives the names below, as when this was one module.
"""

from lmm_align.aot.abstract import (
  GIB,
  Program,
  abstract_head,
  abstract_train_state,
  abstract_variables,
  bytes_per_chip,
  decode_step_flops,
  model_config_of,
  model_flops,
  num_params,
  pass_factors,
  rows,
  sequence_batch,
  trained_modules,
  with_sharding,
)
from lmm_align.aot.plan import (
  EXIT_BAD_INPUT,
  EXIT_DOES_NOT_FIT,
  GENERATIONS,
  PROGRAMS,
  Accelerator,
  Measured,
  accelerator_types,
  devices_for,
  format_gib,
  main,
  measure,
  parse_mesh,
  plan,
  prepare_platforms,
  report,
  resolve_accelerator,
  save_table,
)

__all__ = [
  "EXIT_BAD_INPUT", "EXIT_DOES_NOT_FIT", "GENERATIONS", "GIB", "PROGRAMS", "Accelerator",
  "Measured", "Program", "abstract_head", "abstract_train_state", "abstract_variables",
  "accelerator_types", "bytes_per_chip", "decode_step_flops", "devices_for", "format_gib",
  "main", "measure", "model_config_of", "model_flops", "num_params", "parse_mesh",
  "pass_factors", "plan", "prepare_platforms", "report", "resolve_accelerator", "rows",
  "save_table", "sequence_batch", "trained_modules", "with_sharding",
]  # fmt: skip
