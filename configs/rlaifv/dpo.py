"""RLAIF-V's DPO (arXiv 2405.17220) on RLAIF-V-Dataset, from LLaVA-1.5, on a TPU pod.

  python -m lmm_align.main --config=configs/rlaifv/dpo.py --workdir=gs://B/rlaifv_dpo7b \
      --config.init_from=/mnt/disks/models/llava-1.5-7b-hf \
      --config.data.path='/mnt/disks/data/RLAIF-V-Dataset/RLAIF-V-Dataset-withlogp_*.parquet'
  python -m lmm_align.main --config=configs/rlaifv/dpo.py:model=13b ...        # LLaVA-1.5-13B
  python -m lmm_align.main --config=configs/rlaifv/dpo.py:runlocal --workdir=/tmp/x \
      --config.init_from=TINY_HF_DIR --config.data.path=TINY.parquet

Published settings (RLAIF-V `script/train/llava15_train.sh`, `muffin/train/trainers.py`,
`muffin/train/train_llava15.py`; PROTOCOLS.md §6.1 and §6.3, ALGORITHM_DETAILS.md): sigmoid
DPO with beta 0.1 (the code's default is 0.5; the script sets 0.1) on summed answer-token
log-probs (`dpo_use_average=False`), no SFT term, lr 5e-7 cosine with 5% warmup, weight decay
0.01, global batch 8 (1 x 8 GPUs), max length 2048, images padded to square, the llava_v1
template (`train_llava15.py` asserts it), a full fine-tune of every param including the CLIP
tower (`fully_tune=True`), bf16. The reference is the starting model: its log-probs are read
from the dataset's `logps` column when present (`RLAIF-V-Dataset-withlogp_*.parquet`, the
cache RLAIF-V writes once per round), else computed once before training, as RLAIF-V does when
the cache is missing. One epoch over the 83,132 pairs of the released dataset is 10,392 steps;
RLAIF-V trains about 4 epochs per iteration of its own data, saves every quarter epoch and keeps
the checkpoint best on Object HalBench / MMHal (`lmm-align eval`).

Slice and plan: the published global batch of 8 must divide data x fsdp, so the mesh is
(data, fsdp, tensor) = (1, -1, 2): on a v4-32 (16 chips, 32 GiB each) fsdp is 8 and tensor 2.

  lmm-align plan --config=configs/rlaifv/dpo.py --topology=v4-32   (TPU compiler, libtpu 0.0.42.1)
  program           peak/chip  HBM  headroom
  reference logps   1.93 GiB   32   -          (skipped when the parquet carries `logps`)
  train_step        9.34 GiB   32   22.7 GiB   plan: fits
  With pure FSDP (1, -1, 1) the plan refuses: batch 8 does not divide the 16 chips.

Data (`data.source=rlaifv_parquet`): `openbmb/RLAIF-V-Dataset` shards with `image` {bytes,
path}, `question`, `chosen`, `rejected`, `ds_name`, `idx` (and `logps` in the cached shards);
the images are read from the parquet when a batch needs them. `data.path` takes a file, a glob
or comma-separated shards.

Args: `model=7b|13b`; `runlocal` (tiny: 2 steps, the model and the parquet given on the
command line).
"""

import ml_collections

from configs import common
from configs.llava15 import sft as llava15_sft

NUM_PAIRS = 83_132  # RLAIF-V-Dataset (the dataset card)
INIT_FROM = {
  "7b": "/mnt/disks/models/llava-1.5-7b-hf",
  "13b": "/mnt/disks/models/llava-1.5-13b-hf",
}


def dpo_config(**overrides) -> ml_collections.ConfigDict:
  """RLAIF-V's DPO knobs (the keys lmm_align.trainers.dpo reads)."""
  dpo = dict(
    loss="sigmoid",  # a key of lmm_align.preference_losses.DPO_LOSSES
    beta=0.1,
    label_smoothing=0.0,
    sft_weight=0.0,  # RLAIF-V's SFT_weight, 0 in its scripts
    average_logps=False,  # dpo_use_average=False: summed log-probs
    token_weight=1.0,  # RLHF-V's dense DPO weights changed tokens (3.0); RLAIF-V does not
    precompute_reference=True,  # used only where the data has no cached `logps`
  )
  dpo.update(overrides)
  return ml_collections.ConfigDict(dpo)


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, model="7b")
  llava15_sft.check_model(arg.model)
  config = common.base_config()
  config.trainer = "dpo"
  config.init_from = INIT_FROM[arg.model]
  config.model.variant = llava15_sft.VARIANTS[arg.model]
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "bfloat16"
  config.model.remat_policy = "full"
  config.mesh.sizes = (1, -1, 2)  # batch 8 over data x fsdp; tensor 2 takes the other chips
  config.trainable = (".*",)  # fully_tune: the CLIP tower too

  config.data.source = "rlaifv_parquet"
  config.data.path = "/mnt/disks/data/RLAIF-V-Dataset/RLAIF-V-Dataset-withlogp_*.parquet"
  config.data.template = "llava_v1"
  config.data.aspect_mode = "pad"
  config.data.max_length = 2048
  config.data.buckets = (768, 1024, 1536, 2048)
  config.data.on_error = "raise"

  config.batch_size = 8
  config.total_steps = -(-NUM_PAIRS // config.batch_size)  # one epoch: 10,392
  config.log_every = 10
  config.checkpoint_every = config.total_steps // 4  # a quarter epoch, as RLAIF-V saves
  config.keep_checkpoints = 4
  config.optim.lr = 5e-7
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = -1
  config.optim.warmup_ratio = 0.05
  config.optim.weight_decay = 0.01
  config.dpo = dpo_config()
  if arg.runlocal:
    llava15_sft.runlocal(config, batch_size=8)
  return config
