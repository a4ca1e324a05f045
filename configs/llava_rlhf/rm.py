"""LLaVA-RLHF's fact-augmented reward model (arXiv 2309.14525) on LLaVA-Human-Preference-10K.

  python -m lmm_align.main --config=configs/llava_rlhf/rm.py --workdir=gs://B/rm13b \
      --config.init_from=/mnt/disks/models/llava-rlhf-13b-336-sft \
      --config.data.path=/mnt/disks/data/llava_7b_v1_preference.json \
      --config.data.image_folder=/mnt/disks/data/coco/train2017 \
      --config.data.captions_path=/mnt/disks/data/image_to_caption.json \
      --config.reward.prompt_path=/mnt/disks/code/LLaVA-RLHF/RLHF/prompts/fact_rlhf_reward_prompt.txt
  lmm-align export --workdir=gs://B/rm13b --out=/mnt/disks/models/rm13b-fact   # backbone + head
  python -m lmm_align.main --config=configs/llava_rlhf/rm.py:vanilla ...   # without the facts
  python -m lmm_align.main --config=configs/llava_rlhf/rm.py:runlocal --workdir=/tmp/x \
      --config.init_from=TINY_HF_DIR --config.data.path=PREFS.json \
      --config.data.image_folder=DIR --config.data.captions_path=CAPTIONS.json

Published settings (LLaVA-RLHF `RLHF/scripts/13b-v1.5-336/train_reward_model.sh`,
`RLHF/models/reward_model.py`; PROTOCOLS.md §2.1-2.2): the 13B x 336 SFT model as the backbone
(LLaVA-RLHF trains only a 13B RM and uses it for the 7B policy too; `model=7b` is here for
smaller runs), LoRA r=64 on q, k, v, o, gate, up and down of the LLM with the projector frozen,
a scalar head on the last token's hidden state (left padding; bias initialised to zero), loss
BCE + 1e-3 |mean(r_1 + r_2)|, lr 2e-5 `constant_with_warmup` (3% warmup), no weight decay,
global batch 32 (4 x 8 GPUs), 1 epoch, 500 pairs held out, queries up to 1280 and responses up
to 768 tokens (2048 in all), images padded to square, vicuna_v1 template. Checkpoints every 50
steps; the released RM is checkpoint 200 (early stopping), kept here with keep_checkpoints=10.

Data (`data.source=llava_rlhf`): `llava_7b_v1_preference.json` (records with `conversations`,
`output_1`, `output_2`, `preference` 1 | 2; images from COCO train2017) and LLaVA-RLHF-Data's
`image_to_caption.json` (each image's captions, shuffled per example, inserted into the
evaluation request after the answer). For an exact reproduction point `reward.prompt_path` at
the published `fact_rlhf_reward_prompt.txt` (`reward_prompt.txt` with `:vanilla`); the
sentence above the captions is the trainer's own (reward_data.DEFAULT_FACT_LEAD_IN), not
LLaVA-RLHF's FACTUAL_PROMPT, which a config cannot set yet.

Args: `model=13b|7b` (default 13b); `vanilla` (no facts); `runlocal` (tiny, 2 steps, the model
and the files given on the command line).
"""

import ml_collections

from configs import common
from configs.llava15 import sft as llava15_sft
from configs.shapes import reward as shapes_reward

NUM_PAIRS = 10_000  # LLaVA-Human-Preference-10K
EVAL_PAIRS = 500
INIT_FROM = {
  "7b": "/mnt/disks/models/llava-rlhf-7b-sft",
  "13b": "/mnt/disks/models/llava-rlhf-13b-336-sft",
}
PROMPTS = "/mnt/disks/code/LLaVA-RLHF/RLHF/prompts"


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, model="13b", vanilla=False)
  llava15_sft.check_model(arg.model)
  config = common.base_config()
  config.trainer = "reward"
  config.init_from = INIT_FROM[arg.model]
  config.model.variant = llava15_sft.VARIANTS[arg.model]
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "bfloat16"
  config.model.remat_policy = "full"
  config.mesh.sizes = (1, -1, 1)
  config.lora.rank = 64
  config.lora.alpha = 16.0
  config.lora.targets = (r"language_model/.*_proj",)  # the projector stays frozen

  config.data.source = "llava_rlhf"
  config.data.path = "/mnt/disks/data/llava_7b_v1_preference.json"
  config.data.image_folder = "/mnt/disks/data/coco/train2017"
  config.data.captions_path = "" if arg.vanilla else "/mnt/disks/data/image_to_caption.json"
  config.data.template = "vicuna_v1"
  config.data.aspect_mode = "pad"
  config.data.max_length = 2048  # query_len 1280 + response_len 768
  config.data.buckets = (768, 1024, 1536, 2048)
  config.data.on_error = "raise"

  config.batch_size = 32
  config.total_steps = -(-(NUM_PAIRS - EVAL_PAIRS) // config.batch_size)  # one epoch: 297
  config.log_every = 5
  config.checkpoint_every = 50
  config.keep_checkpoints = 10
  config.optim.lr = 2e-5
  config.optim.schedule = "constant"
  config.optim.warmup_steps = -1
  config.optim.warmup_ratio = 0.03
  config.optim.weight_decay = 0.0
  config.reward = ml_collections.ConfigDict(
    dict(
      fact_augmented=not arg.vanilla,
      prompt_path=f"{PROMPTS}/{'reward_prompt' if arg.vanilla else 'fact_rlhf_reward_prompt'}.txt",
      facts_position="after_response",  # LLaVA-RLHF: in the request after the answer
      # The sentence above the facts; "" = reward_data.DEFAULT_FACT_LEAD_IN. The export
      # records it, and PPO / best-of-N / filtering score with the one the RM learned.
      fact_lead_in="",
      centering_coef=1e-3,
      centering="abs_mean",
      eval_pairs=EVAL_PAIRS,
    )
  )
  if arg.runlocal:
    llava15_sft.runlocal(config, max_length=320, buckets=(192, 256, 320))
    config.lora.rank = 8
    # A short request (the shapes world's): tiny test tokenizers spell long prose in many
    # tokens, and the published request is a paragraph of prose.
    kind = "vanilla" if arg.vanilla else "fact"
    config.reward.prompt_path = str(shapes_reward.PROMPTS / f"shapes_reward_{kind}.txt")
    config.reward.eval_pairs = 2
  return config
