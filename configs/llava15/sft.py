"""LLaVA-1.5 SFT (arXiv 2310.03744): stage 1 (projector pretraining) and stage 2 (visual
instruction tuning), from HF checkpoints, on a TPU pod.

  python -m lmm_align.main --config=configs/llava15/sft.py:stage=2 --workdir=gs://B/llava_sft_7b \
      --config.init_from=/mnt/disks/models/llava-1.5-7b-hf \
      --config.data.path=/mnt/disks/data/llava_v1_5_mix665k.json \
      --config.data.image_folder=/mnt/disks/data
  python -m lmm_align.main --config=configs/llava15/sft.py:stage=1 --workdir=gs://B/llava_pt_7b \
      --config.model.text_init=/mnt/disks/models/vicuna-7b-v1.5 \
      --config.model.vision_init=/mnt/disks/models/clip-vit-large-patch14-336 \
      --config.tokenizer=/mnt/disks/models/llava-1.5-7b-hf \
      --config.data.path=/mnt/disks/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json \
      --config.data.image_folder=/mnt/disks/data/LLaVA-Pretrain/images
  python -m lmm_align.main --config=configs/llava15/sft.py:model=13b --workdir=...  # 13B
  python -m lmm_align.main --config=configs/llava15/sft.py:runlocal --workdir=/tmp/x \
      --config.init_from=TINY_HF_DIR --config.data.path=TINY.json --config.data.image_folder=DIR

Stage 1, LLaVA's `scripts/v1_5/pretrain.sh`: the 558k BLIP-captioned LAION/CC/SBU pairs
(`blip_laion_cc_sbu_558k.json`, LLaVA instruction JSON with one `<image>` turn and its caption),
the `plain` template (image then caption, loss on the caption), images resized and centre-cropped
(`image_aspect_ratio` left at its default, "square"), 2048 tokens, global batch 256 (16 per
device x 4 accumulation x 4 GPUs), lr 1e-3 cosine with 3% warmup, no weight decay, one epoch
(558,128 / 256 = 2181 steps). Only the projector (`tune_mm_mlp_adapter`) trains. As in LLaVA,
the model starts from Vicuna-v1.5 (`model.text_init`, a LlamaForCausalLM folder:
lmsys/vicuna-7b-v1.5) and CLIP ViT-L/14-336 (`model.vision_init`: openai/clip-vit-large-patch14-
336) with a fresh 2-layer GELU projector; the sizes are the variant's (llava-1.5-7b). The
tokenizer is llava-hf's (Vicuna's plus `<image>` and `<pad>`: 32064 rows, the 64 added rows of
the embedding and LM head start at the mean of Vicuna's), so stage 2 and transformers read the
export as they read llava-hf/llava-1.5-7b-hf.

Stage 2, LLaVA's `scripts/v1_5/finetune.sh`: the mix665k instruction data, vicuna_v1 template,
images padded to square (`image_aspect_ratio pad`), 2048 tokens, global batch 128, lr 2e-5
cosine with 3% warmup, no weight decay, one epoch (665k / 128 = 5198 steps). The projector and
the language model train; the CLIP tower stays frozen. `init_from` is stage 1's export, or
llava-hf/llava-1.5-7b-hf to fine-tune further.

Both stages keep params and compute in bf16 and the Adam moments in fp32 (the reference uses
bf16 AMP with fp32 master weights in DeepSpeed; here the params themselves are bf16, updated in
fp32).

Paths. `init_from` is a local or mounted (e.g. gcsfuse) HF folder (`huggingface-cli download
llava-hf/llava-1.5-7b-hf --local-dir ...`); its config.json defines the model, its tokenizer
and preprocessor_config.json the text and image processing. `data.image_folder` is the root the
JSON's relative image paths start from (stage 2: LLaVA's `playground/data`, holding coco/,
gqa/, ocr_vqa/, textvqa/, vg/). The placeholders below must be overridden on the command line,
or the run stops when it reads them.

Sharding and memory (stage 2): pure FSDP, mesh (data, fsdp, tensor) = (1, -1, 1), so every
param and both Adam moments are split over all chips; global batch 128 x 2048 tokens, 576 of
them image tokens per row. The smallest slice is v5p-64 (32 chips, 95 GiB each):

  lmm-align plan --config=configs/llava15/sft.py --topology=v5p-64
  program     peak/chip  HBM  headroom  compile   (the TPU compiler, libtpu 0.0.42.1)
  train_step  36.49 GiB  95   58.5 GiB  88.9 s    plan: fits
  lmm-align plan --config=configs/llava15/sft.py:model=13b --topology=v5e-8
  train_step  >= 69.47 GiB (RESOURCE_EXHAUSTED) of 16   plan: does not fit (exit 3)

Earlier estimates from XLA:CPU's buffer assignment of the same step (not the TPU compiler;
it said 54.1 GiB where the TPU compiler says 36.5), by remat policy:

  model  chips  rows/chip  remat          per-chip peak (XLA:CPU)
  7B     32     4          dots_no_batch  54.1 GiB   <- default: saves the projections' outputs
  7B     32     4          full           16.6 GiB
  7B     32     4          dots / none    121 / 247 GiB (do not fit)
  13B    64     2          full           13.0 GiB   <- default for model=13b
  13B    64     2          dots_no_batch  42.6 GiB
  13B    32     4          dots_no_batch  83.5 GiB   (too close to 95: use full, 24.4 GiB)

dots_no_batch skips recomputing the dense layers in the backward pass (about a quarter of
the step's FLOPs) at the cost of their saved outputs; with fewer chips than these (more rows
per chip) re-run `lmm-align plan`, and switch to `--config.model.remat_policy=full` or raise
`--config.optim.grad_accum_steps`. Stage 1 (256 rows) was not measured: plan it first
(`lmm-align plan --config=configs/llava15/sft.py:stage=1 --topology=...`).

Args: `stage=1|2` (default 2); `model=7b|13b`; `runlocal` (tiny: float32, 2 steps, the
model and the files given on the command line).
"""

from configs import common

NUM_EXAMPLES = {1: 558_128, 2: 665_298}  # blip_laion_cc_sbu_558k.json, llava_v1_5_mix665k.json
# Stage 2 starts from a LLaVA folder (stage 1's export, or llava-hf's).
INIT_FROM = {"7b": "/mnt/disks/models/llava-1.5-7b-hf", "13b": "/mnt/disks/models/llava-1.5-13b-hf"}
# Stage 1 starts from the LLM and the tower, with llava-hf's tokenizer.
TEXT_INIT = {"7b": "/mnt/disks/models/vicuna-7b-v1.5", "13b": "/mnt/disks/models/vicuna-13b-v1.5"}
VISION_INIT = "/mnt/disks/models/clip-vit-large-patch14-336"
DATA = {
  1: ("/mnt/disks/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",
      "/mnt/disks/data/LLaVA-Pretrain/images"),
  2: ("/mnt/disks/data/llava_v1_5_mix665k.json", "/mnt/disks/data"),
}  # fmt: skip
VARIANTS = {"7b": "llava-1.5-7b", "13b": "llava-1.5-13b"}


def check_model(model: str, known=VARIANTS) -> None:
  if model not in known:
    raise ValueError(f"model={model!r}: use one of {sorted(known)}")


def runlocal(config, *, max_length: int = 128, buckets=(96, 128), batch_size: int = 8):
  """The tiny CPU run every recipe's `runlocal` makes: float32, 2 steps, a checkpoint at the
  end, pure FSDP over whatever devices there are (one on a laptop; 8 fake ones in the tests).
  The model and the files come from the command line (`--config.init_from=HF_DIR
  --config.data.path=... --config.data.image_folder=...`); left empty, the run stops naming
  the field."""
  config.init_from = ""
  config.model.text_init = config.model.vision_init = ""
  config.tokenizer = ""
  config.model.variant = "tiny"  # init_from's config.json wins; this only names the size
  config.model.dtype = "float32"
  config.model.param_dtype = "float32"
  config.mesh.sizes = (1, -1, 1)
  config.data.path = ""
  config.data.image_folder = ""
  config.data.captions_path = ""
  config.data.max_length = max_length
  config.data.buckets = tuple(buckets)
  config.batch_size = batch_size
  config.total_steps = 2
  config.log_every = 1
  config.checkpoint_every = 2
  config.optim.warmup_steps = 0
  config.optim.grad_accum_steps = 1
  config.eval.enabled = False
  return config


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, model="7b", stage=2)
  check_model(arg.model)
  if arg.stage not in (1, 2):
    raise ValueError(f"stage={arg.stage}: use 1 (projector pretraining) or 2 (instruction tuning)")
  config = common.base_config()
  config.trainer = "sft"
  config.seed = 0

  # init_from's config.json wins over the variant; the variant serves AOT memory estimates
  # and sizes stage 1's model.
  config.model.variant = VARIANTS[arg.model]
  if arg.stage == 1:
    config.init_from = ""
    config.model.text_init = TEXT_INIT[arg.model]
    config.model.vision_init = VISION_INIT
    config.tokenizer = INIT_FROM[arg.model]
  else:
    config.init_from = INIT_FROM[arg.model]
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "bfloat16"
  config.model.scan_layers = True
  config.model.remat_policy = {"7b": "dots_no_batch", "13b": "full"}[arg.model]
  if arg.stage == 1:
    config.trainable = ("multi_modal_projector/.*",)  # tune_mm_mlp_adapter: the projector only
  else:
    # Stage 2: projector + LLM; the vision tower is frozen (never in the optimizer).
    config.trainable = ("multi_modal_projector/.*", "language_model/.*")

  config.data.source = "llava_json"
  config.data.path, config.data.image_folder = DATA[arg.stage]
  config.data.template = "plain" if arg.stage == 1 else "vicuna_v1"
  config.data.max_length = 2048
  config.data.buckets = (768, 1024, 1536, 2048)  # an image alone is 576 tokens
  config.data.length_policy = "truncate"
  config.data.aspect_mode = "crop" if arg.stage == 1 else "pad"
  # "raise" stops on the first unreadable record, as LLaVA's own loader does; with a partial
  # image download use "skip", which drops and counts such records.
  config.data.on_error = "raise"

  config.batch_size = 256 if arg.stage == 1 else 128
  config.total_steps = -(-NUM_EXAMPLES[arg.stage] // config.batch_size)  # one epoch
  config.log_every = 10
  config.checkpoint_every = 500
  config.keep_checkpoints = 2

  config.optim.lr = 1e-3 if arg.stage == 1 else 2e-5
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
    runlocal(config)
  return config
