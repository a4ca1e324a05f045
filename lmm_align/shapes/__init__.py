"""The shapes world: a synthetic vision-language world with ground truth, the framework's test
bed, as a plugin (`lmm_align.plugins` imports this package; nothing else in lmm_align does).

Scenes, rendering and language (`world`), ground-truth metrics (`metrics`), benchmarks on its
scenes (`benchmarks`), its TFDS builder (`tfds_world`), its evaluation (`evaluation`) and the
vision-tower pretraining (`tower`). Importing the package registers its names: the
"shapes_tower" trainer, and the modules imported below.
"""

# Registrations: each import adds the module's names to a registry.
from lmm_align.shapes import (
  data,  # noqa: F401  (sources shapes, shapes_pairs, shapes_prompts)
  evaluation,  # noqa: F401  (evaluation kind "shapes")
  loop_feedback,  # noqa: F401  (loop prompts "shapes", feedback ground_truth, correction)
  oracle,  # noqa: F401  (oracle reward "scene")
  tower,  # noqa: F401  (trainer "shapes_tower")
)
