"""The shapes world: a synthetic vision-language world with ground truth, the framework's test
bed. Scenes, rendering and language (`world`), ground-truth metrics (`metrics`), benchmarks on
its scenes (`benchmarks`), its TFDS builder (`tfds_world`) and its evaluation (`evaluation`)."""
