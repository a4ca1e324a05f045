"""LLaVA-1.5-7B stage-2 SFT (visual instruction tuning) from the llava-hf checkpoint, on a TPU pod.

  python -m lmm_align.main --config=configs/llava_sft_7b.py --workdir=gs://BUCKET/llava_sft_7b \
      --config.init_from=/mnt/disks/models/llava-1.5-7b-hf \
      --config.data.path=/mnt/disks/data/llava_v1_5_mix665k.json \
      --config.data.image_folder=/mnt/disks/data
  python -m lmm_align.main --config=configs/llava_sft_7b.py:model=13b --workdir=...  # 13B
  python -m lmm_align.main --config=configs/llava_sft_7b.py:runlocal --workdir=/tmp/x  # CPU

The recipe of LLaVA-1.5 `scripts/v1_5/finetune.sh`: the mix665k instruction data, vicuna_v1
template, images padded to square (`image_aspect_ratio pad`), 2048 tokens, global batch 128,
lr 2e-5 cosine with 3% warmup, no weight decay, one epoch (665k / 128 = 5198 steps). The
projector and the language model train; the CLIP tower stays frozen. Params and compute are
bf16 and the Adam moments fp32 (the reference uses bf16 AMP with fp32 master weights in
DeepSpeed ZeRO-3; here the params themselves are bf16, updated in fp32).

Paths. `init_from` is a local or mounted (e.g. gcsfuse) copy of llava-hf/llava-1.5-7b-hf
(`huggingface-cli download llava-hf/llava-1.5-7b-hf --local-dir ...`); its config.json
defines the model, its tokenizer and preprocessor_config.json the text and image processing.
`data.image_folder` is the root the JSON's relative image paths start from (LLaVA's
`playground/data`, holding coco/, gqa/, ocr_vqa/, textvqa/, vg/). The placeholders below
must be overridden on the command line, or the run stops when it reads them.

Sharding and memory: pure FSDP, mesh (data, fsdp, tensor) = (1, -1, 1), so every param and
both Adam moments are split over all chips. Per-chip estimates from
`experiments/bench/aot_memory.py` (XLA:CPU buffer assignment of this exact step; v5p has
95 GiB), global batch 128 x 2048 tokens, 576 of them image tokens per row:

  model  chips  rows/chip  remat          per-chip peak
  7B     32     4          dots_no_batch  54.1 GiB   <- default: saves the projections' outputs
  7B     32     4          full           16.6 GiB
  7B     32     4          dots / none    121 / 247 GiB (do not fit)
  13B    64     2          full           13.0 GiB   <- default for model=13b
  13B    64     2          dots_no_batch  42.6 GiB
  13B    32     4          dots_no_batch  83.5 GiB   (too close to 95: use full, 24.4 GiB)

dots_no_batch skips recomputing the dense layers in the backward pass (about a quarter of
the step's FLOPs) at the cost of their saved outputs; with fewer chips than these (more rows
per chip) re-run the AOT check, and switch to `--config.model.remat_policy=full` or raise
`--config.optim.grad_accum_steps`.

Args: `runlocal` (the tiny variant on the shapes world, a few steps, CPU); `model=13b`.
"""

from configs import common

NUM_EXAMPLES = 665_298  # llava_v1_5_mix665k.json
INIT_FROM = {
  "7b": "/mnt/disks/models/llava-1.5-7b-hf",
  "13b": "/mnt/disks/models/llava-1.5-13b-hf",
}
VARIANTS = {"7b": "llava-1.5-7b", "13b": "llava-1.5-13b"}


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, model="7b")
  if arg.model not in VARIANTS:
    raise ValueError(f"model={arg.model!r}: use one of {sorted(VARIANTS)}")
  config = common.base_config()
  config.trainer = "sft"
  config.seed = 0

  # init_from's config.json wins over the variant; the variant serves AOT memory estimates.
  config.init_from = INIT_FROM[arg.model]
  config.model.variant = VARIANTS[arg.model]
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "bfloat16"
  config.model.scan_layers = True
  config.model.remat_policy = {"7b": "dots_no_batch", "13b": "full"}[arg.model]
  # LLaVA-1.5 stage 2: projector + LLM; the vision tower is frozen (never in the optimizer).
  config.trainable = ("multi_modal_projector/.*", "language_model/.*")

  config.data.source = "llava_json"
  config.data.path = "/mnt/disks/data/llava_v1_5_mix665k.json"
  config.data.image_folder = "/mnt/disks/data"
  config.data.template = "vicuna_v1"
  config.data.max_length = 2048
  config.data.buckets = (768, 1024, 1536, 2048)  # an image alone is 576 tokens
  config.data.length_policy = "truncate"
  config.data.aspect_mode = "pad"
  # "raise" stops on the first unreadable record, as LLaVA's own loader does; with a partial
  # image download use "skip", which drops and counts such records.
  config.data.on_error = "raise"

  config.batch_size = 128
  config.total_steps = -(-NUM_EXAMPLES // config.batch_size)  # one epoch: 5198
  config.log_every = 10
  config.checkpoint_every = 500
  config.keep_checkpoints = 2

  config.optim.lr = 2e-5
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = -1
  config.optim.warmup_ratio = 0.03
  config.optim.weight_decay = 0.0
  config.optim.grad_clip_norm = 1.0
  config.optim.grad_accum_steps = 1
  config.optim.state_dtype = "float32"

  config.mesh.sizes = (1, -1, 1)  # pure FSDP over every chip
  config.eval.enabled = False

  if arg.runlocal:
    config.init_from = ""
    config.model.variant = "tiny"
    config.model.vocab_from_tokenizer = True
    config.model.dtype = "float32"
    config.model.param_dtype = "float32"
    config.data.source = "shapes"
    config.data.path = ""
    config.data.image_folder = ""
    config.data.max_length = 128
    config.data.buckets = (96, 128)
    config.data.shapes.num_train = 64
    config.data.shapes.tokenizer_records = 200
    config.data.shapes.image_size = 32
    config.batch_size = 8
    config.total_steps = 4
    config.log_every = 2
    config.checkpoint_every = 2
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 1
  return config
