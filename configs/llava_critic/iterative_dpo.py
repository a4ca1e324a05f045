"""LLaVA-OneVision-Chat's iterative DPO with LLaVA-Critic as the reward (arXiv 2410.02712):
rounds of sample k answers -> the critic judges every ordered pair -> best vs worst -> DPO.

  python -m lmm_align.main --config=configs/llava_critic/iterative_dpo.py \
      --workdir=gs://B/ov_chat7b \
      --config.init_from=/mnt/disks/models/llava-onevision-qwen2-7b-ov-hf \
      --config.feedback.critic=/mnt/disks/models/llava-critic-7b-hf \
      --config.prompts.source=prompts_jsonl --config.prompts.path=/mnt/disks/data/ov_chat_prompts.jsonl \
      --config.prompts.image_folder=/mnt/disks/data/coco/train2017
  python -m lmm_align.main --config=configs/llava_critic/iterative_dpo.py:model=72b ...
  python -m lmm_align.main --config=configs/llava_critic/iterative_dpo.py:runlocal \
      --workdir=/tmp/x --config.init_from=TINY_HF_DIR --config.feedback.critic=TINY_CRITIC_DIR

Published settings (LLaVA-NeXT `docs/LLaVA_OneVision_Chat.md`, `scripts/train/dpo_ov7b.sh`; the
LLaVA-Critic paper and blog; PROTOCOLS.md §7, ALGORITHM_DETAILS.md):
  policy      LLaVA-OneVision-7B (72B) after its SFT (`lmms-lab/llava-onevision-qwen2-7b-ov`),
              the qwen_1_5 template.
  prompts     about 9.4k prompts of LLaVA-RLHF's data, the last question of each conversation
              [S: LLaVA-NeXT issue #467]; here any RL-prompt source (`prompts.source`:
              prompts_jsonl {id, image, question}, rlaifv_jsonl or llava_rlhf_prompts).
  candidates  k = 5 per prompt at temperature 0.7, top-p 0.9 (up to 1024 new tokens: ours).
  feedback    LLaVA-Critic judges all k(k-1) = 20 ordered pairs with its pairwise prompt; each
              answer's reward is its wins minus its losses over both orders (`critic` feedback,
              `critic.aggregate_pairwise`); both orders count, no swap-agreement filter.
              The critic decodes greedily, up to 4096 new tokens, asked with the model
              card's pairwise prompt (prompts/pairwise.txt, = feedback.critic's
              LLAVA_CRITIC_PAIRWISE).
  pairs       the best against the worst answer of each prompt.
  DPO         beta 0.1, `dpo_alpha` 1 and `gamma` 0 (the DPO loss alone, no SFT term), lr 5e-7
              cosine with 10% warmup, no weight decay, 1 epoch per round, batch 1 x 8
              accumulation per GPU (the GPU count is the launcher's; 8 here), every part
              trained (`mm_tunable_parts` = vision tower, projector, LLM); the reference is the
              round's starting policy, its log-probs computed once.
  rounds      3, each from the previous round's model.
OneVision folders and anyres tiling come with the LLaVA-family work (issue #22).

Slice and plan: v5p-64 (32 chips, 95 GiB each), mesh (data, fsdp, tensor) = (1, 8, 4) for DPO
and the loop's models alike (config.mesh is the DPO mesh, `models_on_slice`): 8 pairs over
data x fsdp = 8 (the published (1, -1, 2) would need 16), the 72B critic's 8 KV heads over
tensor = 4. By the TPU compiler (libtpu 0.0.42.1), the 7B OneVision policy judged by
LLaVA-Critic-72B, each program planned alone (--programs=..., --cost=none):

  lmm-align plan --config=configs/llava_critic/iterative_dpo.py:critic=72b --topology=v5p-64
  program                   peak/chip  HBM  compile
  critic_sampler (72B)      59.53 GiB  95   655 s   16 requests x (16384-token prompt bucket
                                                    + 4096 new), 37 tiles an image, pack plan;
                                                    params 4.26 GiB, temp 55.14 GiB
  critic_decode_step (72B)   8.44 GiB  95    47 s   + the sampler's params beside it: 12.70;
                                                    KV cache 3.13 GiB a chip
  plan: fits peak_gib=59.53 hbm_gib=95.00 device=TPU v5   (host max RSS 12.25 GiB)
  candidates_sampler (7B)   14.44 GiB  95   254 s   5 samples (topped up to 8 rows) x (16384
                                                    + 1024 new), 37 tiles; host RSS 6.0 GiB
  candidates_decode_step     0.95 GiB  95    26 s   + the sampler's params: 1.42
  dpo_reference_logps        6.11 GiB  95    19 s   8 pairs x 8192 tokens, each pair's tiles
  dpo_train_step            24.51 GiB  95   126 s   params 0.47, Adam 1.87 GiB a chip;
                                                    host max RSS 3.5 GiB

  The critic's prompt is planned at its worst: an image's most placeholders (8154, 37 tiles),
  two candidate answers of sampling.max_new_tokens each and 256 tokens of judging prompt, in
  the 16384 bucket; the sampler's temporaries are the prefill's attention over it (2 of the
  16 rows and 2 of the 8 KV heads a chip). The sampler runs
  model-sharded as `generate(mesh=...)` runs it (rows over data x fsdp, params and KV cache
  over fsdp / tensor), across v5p-64's 8 hosts: every process samples the same prompts and
  gets every row back.

`runlocal` is one round at the shapes loop's tiny sizes with critic feedback, on rendered
shapes scenes (a prompt file: see configs/rlaifv/iterative.py's `runlocal`); the critic is
any exported LLaVA folder. The full recipe has no per-round evaluation (`eval.kind=none`).

Args: `model=7b|72b` (the policy); `critic=7b|72b` (LLaVA-Critic's size; default the
policy's); `runlocal`.
"""

import pathlib

from configs import common
from configs.llava15 import sft as llava15_sft
from configs.llava_critic import critic as critic_recipe
from configs.rlaifv import dpo as rlaifv_dpo
from configs.rlaifv import iterative as rlaifv_iterative
from configs.shapes import iterative_dpo as shapes_loop

PROMPTS = pathlib.Path(__file__).resolve().parent / "prompts"
CRITIC = {
  "7b": "/mnt/disks/models/llava-critic-7b-hf",
  "72b": "/mnt/disks/models/llava-critic-72b-hf",
}


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, model="7b", critic="")
  llava15_sft.check_model(arg.model, critic_recipe.VARIANTS)
  critic_size = arg.critic or arg.model  # the critic's size; the policy's by default
  if critic_size not in CRITIC:
    raise ValueError(f"critic={arg.critic!r}: use one of {sorted(CRITIC)}")
  # The loop's fields, from the shapes loop; every published number is set below.
  config = shapes_loop.get_config("feedback=critic" + (",runlocal" if arg.runlocal else ""))
  config.sampling.num_samples = 5
  config.sampling.temperature = 0.7
  config.sampling.top_p = 0.9
  config.sampling.top_k = 0
  config.feedback.critic_debias = False  # LLaVA-Critic sums both orders' verdicts
  config.pairs.method = "best_worst"
  # `lmm-align plan` sizes the critic from this when its folder is not on the planning machine.
  config.feedback.critic_variant = ""
  if arg.runlocal:
    config.feedback.critic = ""  # from the command line
    return rlaifv_iterative.runlocal(config)

  config.rounds = 3
  config.init_from = critic_recipe.INIT_FROM[arg.model]
  config.data.template = "qwen_1_5"
  config.prompts.num_per_round = 9_400
  config.prompts.source = "prompts_jsonl"
  config.prompts.path = "/mnt/disks/data/ov_chat_prompts.jsonl"
  config.prompts.image_folder = "/mnt/disks/data/coco/train2017"
  config.prompts.on_error = "raise"
  config.sampling.max_new_tokens = 1024
  f = config.feedback
  f.critic = CRITIC[critic_size]
  f.critic_variant = critic_recipe.VARIANTS[critic_size]  # LLaVA-Critic is a OneVision model
  f.critic_max_tokens = 4096
  f.critic_prompt = str(PROMPTS / "pairwise.txt")  # the model card's, verbatim
  f.batch_size = 16
  config.eval.kind = "none"  # no per-round evaluation on real prompts (`lmm-align eval` exports)

  train = rlaifv_dpo.get_config()  # the DPO block; the rest is OneVision's
  train.init_from = config.init_from
  train.model.variant = critic_recipe.VARIANTS[arg.model]
  train.data.template = "qwen_1_5"
  train.data.max_length = 8192
  train.data.buckets = (2048, 4096, 8192)
  train.dpo = rlaifv_dpo.dpo_config(beta=0.1, sft_weight=0.0)
  train.optim.lr = 5e-7
  train.optim.warmup_ratio = 0.1
  train.optim.weight_decay = 0.0
  train.batch_size = 8
  config.train = train
  config.epochs_per_round = 1.0
  # v5p-64 (32 chips): 8 pairs over data x fsdp = 8, the 72B critic's KV heads over tensor = 4.
  train.mesh.sizes = (1, -1, 4)
  # The policy and the critic (134 GiB for 72B in bf16) sharded over the DPO mesh.
  rlaifv_iterative.models_on_slice(config)
  return config
