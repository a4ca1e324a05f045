"""LLaVA-RLHF's SFT (arXiv 2309.14525): LLaVA-SFT+ and the RL-init policy, on a TPU pod.

  python -m lmm_align.main --config=configs/llava_rlhf/sft.py:stage=sft_plus --workdir=gs://B/sftp7b \
      --config.init_from=/mnt/disks/models/llava-rlhf-7b-init \
      --config.data.path=/mnt/disks/data/mix-llava-sft90k-vqav2_83k-okvqa_16k-flickr_23k.json \
      --config.data.image_folder=/mnt/disks/data/coco/train2017
  lmm-align export --workdir=gs://B/sftp7b --out=/mnt/disks/models/llava-rlhf-7b-sft
  python -m lmm_align.main --config=configs/llava_rlhf/sft.py:stage=rl_init --workdir=gs://B/rlinit7b \
      --config.init_from=/mnt/disks/models/llava-rlhf-7b-sft \
      --config.data.path=/mnt/disks/data/llava_reward10k-aokvqa5k.json \
      --config.data.image_folder=/mnt/disks/data/coco/train2017
  python -m lmm_align.main --config=configs/llava_rlhf/sft.py:model=13b,stage=rl_init ...  # 13B
  python -m lmm_align.main --config=configs/llava_rlhf/sft.py:runlocal --workdir=/tmp/x \
      --config.init_from=TINY_HF_DIR --config.data.path=TINY.json --config.data.image_folder=DIR

`stage=sft_plus` (LLaVA-RLHF `SFT/scripts/{7b-v1.5-224,13b-v1.5-336}/sft.sh`): LLaVA-SFT+, a full
fine-tune of the projector and the LLM (the CLIP tower frozen) after projector pretraining, on
`mix-llava-sft90k-vqav2_83k-okvqa_16k-flickr_23k.json` (LLaVA instruction JSON, about 212k
records by its name), vicuna_v1 template (`--version v1`), images padded to square, 1280 tokens,
global batch 128 (16 x 8 GPUs for 7B; 8 x 2 accumulation x 8 for 13B), lr 2e-5 cosine with 3%
warmup, no weight decay, 3 epochs. `init_from`: a LLaVA folder of vicuna-v1.5 + CLIP (7B:
ViT-L/14 at 224 px; 13B: ViT-L/14-336) + the stage-1 projector (configs/llava15/sft.py:stage=1).

`stage=rl_init` (`RLHF/scripts/*/initialize_policy_model.sh`): the policy PPO starts from. LoRA
r=64 on q, k, v, o, gate, up and down of the LLM over the SFT+ model, the projector frozen
(`freeze_mm_mlp_adapter`), on `llava_reward10k-aokvqa5k.json` (about 15k records), queries up
to 1280 and responses up to 768 tokens (2048 in all), global batch 128 (8 x 2 x 8 GPUs), lr 1e-4
cosine with 3% warmup, no weight decay, 1 epoch. LoRA alpha is not set by the script; 16 here
(QLoRA's default, which LLaVA-RLHF's code builds on). `lmm-align export` merges the adapters
into an HF folder for `configs/llava_rlhf/ppo.py`'s `init_from` (or `--peft` keeps them apart).

The model size comes from `init_from`'s config.json; `model` names the variant for AOT memory
plans (llava-1.5-7b's tower is 336 px, LLaVA-RLHF 7B's is 224 px: the plan is an upper bound).

Args: `stage=sft_plus|rl_init` (default sft_plus); `model=7b|13b`; `runlocal` (tiny, 2 steps,
the model and the files given on the command line).
"""

from configs import common
from configs.llava15 import sft as llava15_sft

STAGES = ("sft_plus", "rl_init")
NUM_EXAMPLES = {"sft_plus": 90_000 + 83_000 + 16_000 + 23_000, "rl_init": 10_000 + 5_000}
EPOCHS = {"sft_plus": 3, "rl_init": 1}
INIT_FROM = {
  ("sft_plus", "7b"): "/mnt/disks/models/llava-rlhf-7b-init",
  ("sft_plus", "13b"): "/mnt/disks/models/llava-rlhf-13b-336-init",
  ("rl_init", "7b"): "/mnt/disks/models/llava-rlhf-7b-sft",
  ("rl_init", "13b"): "/mnt/disks/models/llava-rlhf-13b-336-sft",
}
DATA = {
  "sft_plus": "/mnt/disks/data/mix-llava-sft90k-vqav2_83k-okvqa_16k-flickr_23k.json",
  "rl_init": "/mnt/disks/data/llava_reward10k-aokvqa5k.json",
}


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, model="7b", stage="sft_plus")
  llava15_sft.check_model(arg.model)
  if arg.stage not in STAGES:
    raise ValueError(f"stage={arg.stage!r}: use one of {STAGES}")
  config = common.base_config()
  config.trainer = "sft"
  config.init_from = INIT_FROM[arg.stage, arg.model]
  config.model.variant = llava15_sft.VARIANTS[arg.model]
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "bfloat16"
  config.model.remat_policy = "full"

  config.data.source = "llava_json"
  config.data.path = DATA[arg.stage]
  config.data.image_folder = "/mnt/disks/data/coco/train2017"
  config.data.template = "vicuna_v1"
  config.data.aspect_mode = "pad"
  config.data.on_error = "raise"
  config.batch_size = 128
  config.total_steps = EPOCHS[arg.stage] * -(-NUM_EXAMPLES[arg.stage] // config.batch_size)
  config.checkpoint_every = 500
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = -1
  config.optim.warmup_ratio = 0.03
  config.optim.weight_decay = 0.0
  config.mesh.sizes = (1, -1, 1)

  if arg.stage == "sft_plus":
    config.trainable = ("multi_modal_projector/.*", "language_model/.*")
    config.data.max_length = 1280  # model_max_length
    config.data.buckets = (768, 1024, 1280)
    config.optim.lr = 2e-5
  else:
    # LoRA on the LLM's seven projections; `trainable` selects among the adapters.
    config.lora.rank = 64
    config.lora.alpha = 16.0
    config.lora.targets = (r"language_model/.*_proj",)
    config.trainable = (".*",)
    config.data.max_length = 2048  # query_len 1280 + response_len 768
    config.data.buckets = (768, 1024, 1536, 2048)
    config.optim.lr = 1e-4

  if arg.runlocal:
    llava15_sft.runlocal(config)
    if arg.stage == "rl_init":
      config.lora.rank = 8
  return config
