"""RLAIF-V's iterative alignment (arXiv 2405.17220): rounds of sample -> divide-and-conquer AI
feedback -> pairs -> DPO, each round starting from the last one's policy.

  python -m lmm_align.main --config=configs/rlaifv/iterative.py \
      --workdir=gs://B/rlaifv_loop7b \
      --config.init_from=/mnt/disks/models/llava-1.5-7b-hf \
      --config.feedback.labeler=/mnt/disks/models/llava-v1.6-34b-hf \
      --config.prompts.source=rlaifv_jsonl --config.prompts.path=/mnt/disks/data/rlaifv_prompts.jsonl \
      --config.prompts.image_folder=/mnt/disks/data/rlaifv_images
  python -m lmm_align.main --config=configs/rlaifv/iterative.py:feedback=self ...
  python -m lmm_align.main --config=configs/rlaifv/iterative.py:runlocal --workdir=/tmp/x \
      --config.init_from=TINY_HF_DIR --config.feedback.labeler=TINY_HF_DIR

Published settings (RLAIF-V `script/data_gen/*`, `utils/pair_construction.py`,
`utils/get_pairs_filter_shorten.py`, `script/train/llava15_train.sh`; PROTOCOLS.md §6,
ALGORITHM_DETAILS.md):
  candidates  10 per prompt (`--repeat 10`) at temperature 0.7, one decoding setting, different
              seeds, up to 512 new tokens, the llava_v1 template; about 4k prompts per round [S].
  feedback    each answer's claims become yes/no questions ("... Please answer yes or no.");
              the labeler's p(yes)+p(Yes) against p(no)+p(No), a claim rejected iff
              p_no >= p_yes; score = -(rejected claims). The labeler is LLaVA-NeXT-34B for the
              7B policy (`feedback=rlaifv`, `feedback.labeler`), or the policy itself
              (`feedback=self`, RLAIF-V's self-alignment of OmniLMM-12B). RLAIF-V splits claims
              and writes the questions with two fine-tuned Llama-3-8B models; the loop uses its
              rule-based splitter and question maker.
  pairs       every pair of a prompt's answers whose scores differ by >= 1, at most 2 per
              prompt, then length balancing (drop pairs whose rejected answer is longer by more
              than a ratio chosen to even the average lengths).
  DPO         configs/rlaifv/dpo.py's: sigmoid, beta 0.1, summed log-probs, lr 5e-7 cosine, 5%
              warmup, weight decay 0.01, batch 8, a full fine-tune; the reference is the round's
              starting policy, its log-probs computed once. About 4 epochs per round.
  rounds      4. RLAIF-V keeps the checkpoint best on Object HalBench / MMHal after each round;
              this loop keeps each round's last checkpoint and, with a per-round evaluation
              and `eval.select_metric`, names the best round in summary.json ("best"): e.g.
              `--config.eval.kind=pope --config.eval.pope.paths=/mnt/disks/data/pope/coco_pope_*.json
              --config.eval.pope.image_folder=/mnt/disks/data/coco/val2014
              --config.eval.select_metric=pope_f1` (Object HalBench and MMHal need a judge or
              COCO annotations: score the round exports with `lmm-align eval chair|mmhal`).

`prompts.source` is an RL-prompt source of lmm_align.data.registry: `rlaifv_jsonl` (the
pipeline's input, {ds_question_id, image_path, question, metainfos}), `prompts_jsonl`
({id, image, question}) or `llava_rlhf_prompts`; each round draws `prompts.num_per_round` of
them. `runlocal` is one round at the shapes loop's tiny sizes (4 samples of 16 tokens, 2 DPO
steps) on rendered shapes scenes, with the shapes world's per-round evaluation (see `runlocal`
for why not a prompt file yet).

Slice and plan: v5p-16 (8 chips, 95 GiB each), mesh (data, fsdp, tensor) = (1, 4, 2), the DPO
config's. The stages run one after another, each with only its own model in HBM:

  lmm-align plan --config=configs/rlaifv/iterative.py:model=7b --topology=v5p-16 --cost=scanned
  program                 peak/chip  HBM  compile  (the TPU compiler, libtpu 0.0.42.1)
  candidates_sampler       5.23 GiB  95    96 s    10 samples x (1024-token prompt bucket + 512)
  candidates_decode_step   4.56 GiB  95    15 s    2.91 + the sampler's params beside it
  labeler_yes_no (34B)    24.42 GiB  95    49 s    16 questions x 4096 tokens, 5 tiles an image
  dpo_reference_logps      4.07 GiB  95    54 s
  dpo_train_step          18.81 GiB  95   304 s    plan: fits (9.4 min, host RSS 3.7 GB)

  A decode step of the candidates (unrolled, no loop left to cost): compiled FLOPs 1.06 x the
  model's, bytes accessed 6.95 x the least it must read (weights + KV cache once: 2.66 GiB a
  chip), 8.5 ms a step by the compiler's estimate: 10 rows leave it bound by re-reading the
  fsdp-gathered weights. The other programs' FLOP ratios are not given here: --cost=scanned
  costs one layer of their stacks (the unrolled cost pass of the 34B labeler was not run).
  The loop loads the policy and the labeler as the plan holds them: bf16 (inference.dtype),
  sharded by the DPO config's mesh and rules (config.mesh, `models_on_slice`), each tensor
  straight onto its shards (`inference.load_model_folder(mesh=...)`), across v5p-16's 2 hosts:
  each process places only its own chips' shards and rows, and the sampler's and the
  labeler's outputs come back to every host (`sampling.generate(mesh=...)`). The labeler
  row is planned as `YesNoLabeler` batches a LLaVA-NeXT image: all 5 tiles, up to 2928
  placeholders, the pack plan (an earlier plan with one base tile a row said 8.73 GiB).

Args: `feedback=rlaifv|self` (default rlaifv); `model=7b|13b` (the policy); `runlocal`.
"""

import ml_collections

from configs import common
from configs.llava15 import sft as llava15_sft
from configs.rlaifv import dpo as rlaifv_dpo
from configs.shapes import iterative_dpo as shapes_loop

FEEDBACK = ("rlaifv", "self")
LABELER = "/mnt/disks/models/llava-v1.6-34b-hf"  # LLaVA-NeXT-34B, RLAIF-V's 7B labeler


def runlocal(config):
  """One tiny round at the shapes loop's sizes, its prompts rendered shapes scenes; on a
  prompt file add `--config.prompts.source=rlaifv_jsonl --config.prompts.path=...
  --config.prompts.image_folder=... --config.eval.kind=none` (tests/trainers/test_iterative.py
  runs a round so)."""
  config.rounds = 1
  return config


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, model="7b", feedback="rlaifv")
  llava15_sft.check_model(arg.model)
  if arg.feedback not in FEEDBACK:
    raise ValueError(f"feedback={arg.feedback!r}: use one of {FEEDBACK}")
  # The loop's fields, from the shapes loop; every published number is set below.
  config = shapes_loop.get_config(
    f"feedback={arg.feedback}" + (",runlocal" if arg.runlocal else "")
  )
  if arg.runlocal:
    return runlocal(config)

  config.rounds = 4
  config.init_from = rlaifv_dpo.INIT_FROM[arg.model]
  config.data.template = "llava_v1"
  config.prompts.num_per_round = 4000
  config.prompts.source = "rlaifv_jsonl"
  config.prompts.path = "/mnt/disks/data/rlaifv_prompts.jsonl"
  config.prompts.image_folder = "/mnt/disks/data/rlaifv_images"
  config.prompts.on_error = "raise"
  config.sampling.num_samples = 10
  config.sampling.temperature = 0.7
  config.sampling.top_k = 0
  config.sampling.top_p = 1.0
  config.sampling.max_new_tokens = 512
  f = config.feedback
  f.labeler = LABELER if arg.feedback == "rlaifv" else ""
  # `lmm-align plan` sizes the labeler from this when its folder is not on the planning machine.
  f.labeler_variant = "llava-next-34b" if arg.feedback == "rlaifv" else ""
  f.reject_margin = 0.0  # rejected iff log p_no - log p_yes >= 0
  f.yes_words, f.no_words = ("yes", "Yes"), ("no", "No")
  f.question_suffix = " Please answer yes or no."
  # Claims and questions: RLAIF-V's fine-tuned LLaMA-3-8B split / changeq models, served
  # (e.g. by vLLM) behind an OpenAI-compatible endpoint, or a local text model:
  # --config.feedback.splitter=openai:MODEL --config.feedback.splitter_base_url=URL, or
  # --config.feedback.splitter=model:HF_DIR. The default rules suit short declarative answers.
  # No per-round evaluation unless asked (eval.kind=pope with POPE files, above); score the
  # round exports with `lmm-align eval`.
  config.eval.kind = "none"
  config.pairs.per_prompt = 2
  config.pairs.min_score_gap = 1
  config.pairs.balance_lengths = True
  config.pairs.sft_on = "all"  # no effect: the DPO has no SFT term (sft_weight 0)
  config.train = rlaifv_dpo.get_config(f"model={arg.model}")
  config.epochs_per_round = 4.0
  models_on_slice(config)
  return config


def models_on_slice(config):
  """The loop's models (policy, labeler or critic) in bfloat16, sharded over the DPO config's
  mesh ((1, 4, 2) on v5p-16), so the 34B labeler (64 GiB in bf16) loads 8 GiB a chip and
  samples, labels and judges model-sharded."""
  config.inference.dtype = "bfloat16"
  config.mesh = ml_collections.ConfigDict(config.train.mesh.to_dict())
