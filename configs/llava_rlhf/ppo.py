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

Slice and plan: v5p-16 (8 chips, 95 GiB each), pure FSDP (1, -1, 1), layers scanned, remat
"full", each 256-row update as 2 micro-batches of 128. Every program's peak counts beside it the
run's other buffers (frozen 7B and 13B bases, adapters and Adam moments). It fits:

  lmm-align plan --config=configs/llava_rlhf/ppo.py:model=7b --topology=v5p-16 --cost=scanned
  program               peak+resident/chip  HBM  compile   (the TPU compiler, libtpu 0.0.42.1)
  ppo_merge_lora          9.00 GiB          95     3 s
  ppo_sampler            80.27 GiB          95   420 s    512 rows x 1600 slots: KV cache 50 GiB
  ppo_decode_step        60.83 GiB          95    35 s
  ppo_policy_logps       10.75 GiB          95   107 s    32 rows x 1600 tokens (forward_batch)
  ppo_reference_logps    10.72 GiB          95   104 s
  ppo_values (13B)       11.52 GiB          95    42 s
  ppo_reward_scores      13.64 GiB          95    58 s    32 rows x 2048 (the largest bucket)
  ppo_train_step         55.40 GiB          95   264 s    2 x 128 rows
  plan: fits peak_gib=80.27 hbm_gib=95.00 device=TPU v5  (19 min, host max RSS 6.1 GiB)

How it came to fit. With the layers unrolled the update needed 99.4 GiB a chip at 4 x 64 rows
(117 GiB of temporaries in one pass): the compiler's buffer report showed the f32 attention
scores ([rows, heads, 1600, 1600]) of several layers and of both models live at once, since
unrolled layers leave the scheduler free to overlap their rematerialised forwards. Scanned,
the loop bounds it: 33.0 GiB at 4 x 64, 55.4 at 2 x 128, 95.6 in one pass (the update alone,
same compiler). The sampler decodes unrolled either way: `sampling.decode` unstacks the scanned
weights before its prefill, so its cache is one buffer per layer from the start (a scanned
prefill's stacked cache copied into per-layer buffers peaked at 101.5 GiB).

  A decode step (512 rows against 1600 slots, no loop left to cost): compiled FLOPs 1.061 x
  the model's, bytes accessed 1.605 x the least it must read (weights + KV cache once: 51.5
  GiB a chip), 37.8 ms a step by the compiler's estimate (896 steps: about 34 s a rollout).
  The other programs' FLOPs here count one layer of each scanned stack (--cost=scanned).

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
  # Scanned layers: the loop bounds what the update keeps live (unrolled, XLA overlapped the
  # layers' f32 attention scores: 99 GiB a chip at 4 x 64 rows on v5p-16; scanned, 55 GiB at
  # 2 x 128). The sampler still decodes unrolled (`sampling.decode` unstacks the weights).
  config.model.scan_layers = True
  config.mesh.sizes = (1, -1, 1)
  config.lora.rank = 64
  config.lora.alpha = 16.0
  config.lora.targets = (r"language_model/.*_proj",)
  config.optim.lr = 3e-5
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 5
  config.optim.grad_clip_norm = 1.0
  # Each 256-row update in 2 micro-batches of 128 (16 rows a chip on v5p-16): in one pass its
  # 1600-token rows through the 7B policy and 13B value need 88 GiB of temporaries a chip.
  config.optim.grad_accum_steps = 2
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
