"""SFT of a tiny LLaVA on the synthetic shapes world: CPU, about 11 minutes, ground-truth metrics.

  python -m lmm_align.main --config=configs/shapes/sft.py --workdir=/tmp/shapes_sft
  python -m lmm_align.main --config=configs/shapes/sft.py:runlocal --workdir=/tmp/t   # seconds
  python -m lmm_align.main --config=configs/shapes/sft.py:tower=DIR --workdir=/tmp/shapes_sft

`tower=DIR` starts the vision tower from a pretrained CLIPVisionModel folder
(configs/shapes/tower.py writes one for this world) and keeps it frozen, as LLaVA
does with CLIP; without it the tower trains from scratch through the language loss.

A share of the answers (data.shapes.hallucination_rate) carries an injected hallucination,
like the machine-written instruction data that motivated LLaVA-RLHF, so the SFT model
hallucinates and alignment has something to fix. summary.json reports the hallucination
rate, object recall and POPE F1 on held-out scenes.
"""

from configs import common
from configs import shapes as shapes_configs


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, tower="")
  config = shapes_configs.base_config()
  config.trainer = "sft"
  config.model.variant = "shapes"
  config.model.vocab_from_tokenizer = True
  config.model.image_size = 48
  config.data.source = "shapes"
  config.data.aspect_mode = "crop"
  config.data.max_length = 128
  config.data.buckets = (96, 128)
  config.total_steps = 1500
  config.batch_size = 32
  config.log_every = 20
  config.checkpoint_every = 500
  # 1e-3 learns the language prior and ignores the image (teacher-forced accuracy is the same
  # with a blank image); 3e-4 learns to look.
  config.optim.lr = 3e-4
  config.optim.warmup_steps = 20
  config.optim.weight_decay = 0.0
  if arg.tower:
    config.model.vision_init = arg.tower
    config.trainable = ("(multi_modal_projector|language_model)/.*",)
  config.eval.enabled = True
  config.eval.num_scenes = 128
  config.sweep = (
    ("clean_data", {"data.shapes.hallucination_rate": 0.0}),
    ("noisy_data", {"data.shapes.hallucination_rate": 0.3}),
  )
  if arg.runlocal:
    config.total_steps = 6
    config.batch_size = 8
    config.log_every = 2
    config.checkpoint_every = 3
    config.data.shapes.num_train = 64
    config.data.shapes.tokenizer_records = 200
    config.eval.num_scenes = 8
    config.eval.pope_per_split = 8
    config.eval.max_new_tokens = 16
  return config
