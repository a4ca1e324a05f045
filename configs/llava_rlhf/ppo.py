"""LLaVA-RLHF's PPO (arXiv 2309.14525) on its published RL prompts, with the fact-augmented RM.

  python -m lmm_align.main --config=configs/llava_rlhf/ppo.py --workdir=gs://B/ppo7b \
    --config.init_from=/mnt/disks/models/llava-rlhf-7b-rl-init \
    --config.ppo.reward_model=/mnt/disks/models/rm13b-fact \
    --config.data.path=/mnt/disks/data/llava_ppo50k-aokvqa12k-vqa10k.json \
    --config.data.image_folder=/mnt/disks/data/coco/train2017 \
    --config.data.captions_path=/mnt/disks/data/image_to_caption.json
  python -m lmm_align.main --config=configs/llava_rlhf/ppo.py:model=13b ...   # the 13B x 336 policy
  python -m lmm_align.main --config=configs/llava_rlhf/ppo.py:vanilla ...     # RM without facts
  python -m lmm_align.main --config=configs/llava_rlhf/ppo.py:runlocal --workdir=/tmp/x \
    --config.init_from=TINY_HF_DIR --config.ppo.reward_model=TINY_RM_DIR \
    --config.data.path=PROMPTS.json --config.data.image_folder=DIR \
    --config.data.captions_path=CAPTIONS.json

Published settings (`RLHF/scripts/{7b-v1.5-224,13b-v1.5-336}/train_rl_model.sh`,
`RLHF/models/ppo_trainer.py`, `rl_trainer.py`; PROTOCOLS.md §2.3-2.4, ALGORITHM_DETAILS.md).
The policy is the RL-init model (configs/llava_rlhf/sft.py:stage=rl_init, exported); the
reward model is the 13B x 336 fact-augmented RM (configs/llava_rlhf/rm.py, exported) for both
policy sizes, and it also initialises the value model (zero-initialised head). Prompts: the
first human turn of `llava_ppo50k-aokvqa12k-vqa10k.json` (`data.source=llava_rlhf_prompts`,
`caption_type` and `length_bonus` honoured), the RM reading each image's captions from
`image_to_caption.json` ("aok_" keys for the A-OKVQA multiple-choice items).

Every published quirk is a flag here, set to the published value: k1 clamped at 0 with coef
0.1; the score on the last column of the padded response, not at EOS; rewards (KL included)
x10 instead of whitening; GAE over all columns with gamma = lam = 1; advantages whitened over
the whole batch, padding included; losses averaged over every column; responses cut after the
first '?' token; a relative -8 penalty for a missing stop token; length term -10 x tokens /
response_len; correctness +2. Sampling T=1, top-p 1, top-k 0; queries left-padded to 128 text
tokens + the image's 576 placeholders (longer ones dropped), 896 new tokens. Rollout 512 /
step 256, 2 PPO epochs, 4 epochs over the 72k prompts, lr 3e-5 cosine, 5 warmup steps, grad
norm 1.0, LoRA r=64 on policy and value.
LLaVA-RLHF runs 4-bit QLoRA bases; here the bases are bf16.

Slice and plan: v5p-16 (8 chips, 95 GiB each), pure FSDP (1, -1, 1), layers unrolled (from a
scanned prefill the sampler copies the 512-row stacked KV cache into per-layer buffers: 101.5
GiB a chip), each 256-row update as 4 micro-batches of 64. Every program's peak counts beside
it the run's other buffers (frozen 7B and 13B bases 4.76 GiB, adapters and Adam moments 2.6
GiB a chip). The rollout fits; the update does NOT fit v5p-16 yet (exit 3):

  lmm-align plan --config=configs/llava_rlhf/ppo.py:model=7b --topology=v5p-16
  program               peak+resident/chip  HBM  compile   (the TPU compiler, libtpu 0.0.42.1)
  ppo_merge_lora          9.00 GiB          95    34 s
  ppo_sampler            79.09 GiB          95   430 s    512 rows x 1600 slots: KV cache 50 GiB
  ppo_decode_step        60.83 GiB          95   105 s
  ppo_policy_logps       11.96 GiB          95   241 s    32 rows x 1600 tokens (forward_batch)
  ppo_reference_logps    11.88 GiB          95   201 s
  ppo_values (13B)       13.79 GiB          95   216 s
  ppo_reward_scores      15.88 GiB          95   107 s    32 rows x 2048 (the largest bucket)
  ppo_train_step         99.41 GiB          95  1715 s    4 x 64 rows: does not fit
  ppo_train_step        124.63 GiB (at least)       289 s    256 rows in one pass:
                        RESOURCE_EXHAUSTED, 117.28 GiB of temporaries
  The rollout programs took 28 min and 17 GB of host memory (before plan cleared JAX's
  caches); the update alone (--programs=ppo_train_step --cost=scanned) 29 min and 16 GB.
  Micro-batching cut the update's temporaries only from 117 to 92 GiB: most of them do not
  scale with the rows (presumably the FSDP-gathered weights of the 72 unrolled layers of
  policy and value). Not yet tried: 8 micro-batches, a (1, 4, 2) mesh (tensor-parallel
  weights), scanned layers for the update only, or v5p-32.

  A decode step (512 rows against 1600 slots, no loop left to cost): compiled FLOPs 1.061 x
  the model's, bytes accessed 1.605 x the least it must read (weights + KV cache once: 51.5
  GiB a chip), 37.8 ms a step by the compiler's estimate (896 steps: about 34 s a rollout).
  The forwards' compiled FLOPs are 0.53-0.59 x the model's: the TPU compiler turns the FSDP
  weight gathers into hundreds of collective-matmul loops whose bodies it costs once, so
  those ratios and times are lower bounds.

Args: `model=7b|13b` (the policy; default 7b); `vanilla` (an RM without facts); `runlocal`
(tiny: 2 iterations of 8 rollouts, the models and the files given on the command line).
"""

from configs import common
from configs.llava15 import sft as llava15_sft
from configs.shapes import ppo as shapes_ppo

NUM_PROMPTS = 50_000 + 12_000 + 10_000  # llava_ppo50k-aokvqa12k-vqa10k.json
INIT_FROM = {
  "7b": "/mnt/disks/models/llava-rlhf-7b-rl-init",
  "13b": "/mnt/disks/models/llava-rlhf-13b-336-rl-init",
}
REWARD_MODEL = "/mnt/disks/models/rm13b-fact"  # the 13B x 336 RM, for either policy
# LLaVA-RLHF's 128-token query limit counts the image as one token; here the query holds its
# 576 placeholders (CLIP-336), so the same limit is 128 + 576 (with 128, every image prompt
# would be dropped as too long).
QUERY_LEN = 128 + 576


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, model="7b", vanilla=False)
  llava15_sft.check_model(arg.model)
  config = common.base_config()
  config.trainer = "ppo"
  config.init_from = INIT_FROM[arg.model]
  config.model.variant = llava15_sft.VARIANTS[arg.model]
  config.data.source = "llava_rlhf_prompts"
  config.data.path = "/mnt/disks/data/llava_ppo50k-aokvqa12k-vqa10k.json"
  config.data.image_folder = "/mnt/disks/data/coco/train2017"
  config.data.captions_path = "" if arg.vanilla else "/mnt/disks/data/image_to_caption.json"
  config.data.template = "vicuna_v1"
  config.data.aspect_mode = "pad"
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "bfloat16"
  config.model.remat_policy = "full"
  # Unrolled layers: the rollout sampler decodes layer by layer, and from a scanned model's
  # prefill it copies the stacked KV cache into per-layer buffers, two caches at once (512 rows
  # x 1600 slots: 50 GiB a chip each on v5p-16, 101.5 GiB peak; see the plan above).
  config.model.scan_layers = False
  config.mesh.sizes = (1, -1, 1)
  config.lora.rank = 64
  config.lora.alpha = 16.0
  config.lora.targets = (r"language_model/.*_proj",)
  config.optim.lr = 3e-5
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 5
  config.optim.grad_clip_norm = 1.0
  # Each 256-row update in 4 micro-batches of 64 (8 rows a chip on v5p-16): in one pass its
  # 1600-token rows through the 7B policy and 13B value need 117 GiB of temporaries a chip.
  config.optim.grad_accum_steps = 4
  config.optim.weight_decay = 0.0
  # 4 epochs of the 72k prompts in rollouts of 512.
  config.total_steps = 4 * NUM_PROMPTS // 512
  config.checkpoint_every = 20
  config.ppo = shapes_ppo.ppo_config(
    reward_model=REWARD_MODEL, reward_model_variant="llava-1.5-13b",
    fact_augmented=not arg.vanilla, query_len=QUERY_LEN, max_new_tokens=896,
    truncate_at_question_mark=True, rollout_batch_size=512, step_batch_size=256,
    forward_batch_size=32, noptepochs=2, kl_coef=0.1, kl_estimator="k1_clamped",
    score_position="last_column", whiten_rewards=False, reward_scale=10.0, gamma=1.0, lam=1.0,
    mean_over_padding=True, clip_eps=0.2, clip_value=0.2, vf_coef=0.1, correct_coef=2.0,
    length_coef=-10.0, stop_penalty=-8.0, relative_stop_penalty=True,
    reward_buckets=(1280, 1536, 2048),
  )  # fmt: skip
  if arg.runlocal:
    llava15_sft.runlocal(config)
    # The shapes PPO test's tiny sizes, on one device (4-row steps divide no wider mesh).
    local = shapes_ppo.get_config("runlocal")
    config.mesh.sizes, config.mesh.num_devices = (1, 1, 1), 1
    config.ppo.reward_model, config.ppo.reward_model_variant = "", ""  # the tiny policy's size
    config.lora.rank, config.lora.alpha = 8, 16.0
    config.total_steps, config.checkpoint_every = 2, 1
    config.ppo.query_len = 64
    for key in ("max_new_tokens", "rollout_batch_size", "step_batch_size",
                "forward_batch_size", "reward_buckets"):  # fmt: skip
      config.ppo[key] = local.ppo[key]
  return config
