"""The shapes world: a synthetic vision-language world with ground truth, the framework's test
bed, as a plugin (`lmm_align.plugins` imports this package; nothing else in lmm_align does).

  world          scenes, rendering and language
  metrics        ground-truth metrics of a response against its scene
  benchmarks     POPE / CHAIR-style benchmarks on its scenes; tfds_world: its TFDS builder
  data           its data sources (SFT conversations, preference pairs, RL prompts)
  critic_records pointwise / pairwise critic instructions with ground-truth verdicts
  evaluation     the "shapes" evaluation of a run's model
  oracle         the ground-truth reward in the reward model's place (PPO's "scene")
  loop_feedback  the iterative loop's scene prompts and ground-truth feedback kinds
  loop_models    training data and accuracy reports of the loop's labeler and critic
  tower          the vision-tower pretraining (trainer "shapes_tower")

Importing the package registers the names the modules below define.
"""

# Registrations: each import adds the module's names to a registry.
from lmm_align.shapes import (
  data,  # noqa: F401  (sources shapes, shapes_pairs, shapes_prompts)
  evaluation,  # noqa: F401  (evaluation kind "shapes")
  loop_feedback,  # noqa: F401  (loop prompts "shapes", feedback ground_truth, correction)
  oracle,  # noqa: F401  (oracle reward "scene")
  tower,  # noqa: F401  (trainer "shapes_tower")
)
