"""DPO step speed on CPU: our jitted `dpo_train_step` against TRL's `DPOTrainer`, same work.

  pip install trl==1.16.0     # the reference only: pulls accelerate and datasets; not a project
                              # requirement (it runs with the venv's torch and transformers)
  python experiments/bench/dpo_vs_trl.py [--variant=tiny] [--pairs=4] [--prompt_len=32]
      [--answer_len=48] [--steps=10] [--remat] [--threads=1]

One random LLaVA of a variant's shape (`transformers.LlavaForConditionalGeneration` built from
`to_hf_config` of VARIANTS["tiny"], "shapes" or "small") is saved to a temp folder; TRL loads
it with `from_pretrained` and we load it with `lmm_align.hf.load_pretrained`, so both start
from the same weights. Both then run the same work:
  * the same `--steps + 1` batches of pairs, in the same order: each row one image (its
    placeholders first), a random prompt, then a random chosen / rejected answer ending in EOS,
    right-padded to one length T; the log-probs sum over the answer tokens;
  * DPO sigmoid loss, beta 0.1; the reference is the starting model, its log-probs computed in
    every step by a frozen copy (TRL does not precompute them for vision data, so neither side
    does);
  * full fine-tune (every param, the vision tower included), float32;
  * AdamW (b1 0.9, b2 0.999, eps 1e-8), constant lr, no weight decay, grad norm clipped at 1;
  * no activation recomputation unless `--remat` (ours remat "full", TRL gradient checkpointing).
TRL gets the batches through its `data_collator` (its own collator would re-tokenise text), in
its layout: chosen rows then rejected rows, `completion_mask` on the answers, NCHW pixels.

Timed: steps 2 .. N + 1 (the first step compiles ours and warms TRL up), each from the end of
the step before. Ours: converting the numpy batch, the step, reading back the loss. TRL: between
`on_step_end` callbacks (data loading, forward, backward, optimizer and logging included).
Reported: the median step (a shared CPU's load spikes hit single steps; the mean is printed
too). Tokens/s counts every position of the batch (2 x pairs x T).
The losses of the two runs are printed side by side: they agree to float32 rounding when
both do the same maths.

MFU: model FLOPs of one step over the best float32 [n, n] matmul of this CPU measured by JAX
in this process (experiments/bench/train_step.py's `step_flops` and `matmul_peak_flops`): the
policy's forward and backward over 2B rows (6 x params per token, attention, the vision tower
trained) plus the reference's forward (a third of that). The last line is
`lmm_align / trl: X.XX` (tokens/s ratio). On a shared CPU both sides move with the load.

Threads: `--threads=1` (default) runs torch on one thread and XLA:CPU's matmuls on one thread
(`--xla_cpu_multi_thread_eigen=false`). On a small CPU shared with other jobs, torch's
multi-threaded ops pay a thread-pool barrier per op that dwarfs tiny kernels (measured here
under load: a [8, 96, 64] `pow` took 7 us on one thread and 6.8 ms on two), which would
measure the machine's load rather than TRL. `--threads=0` keeps each library's defaults.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variant", default="tiny", choices=("tiny", "shapes", "small"))
  p.add_argument("--pairs", type=int, default=4, help="pairs per step (2x rows)")
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--answer_len", type=int, default=48)
  p.add_argument("--steps", type=int, default=10, help="timed steps (after one warm-up)")
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--remat", action="store_true", help="ours remat full, TRL checkpointing")
  p.add_argument(
    "--threads", type=int, default=1, choices=(0, 1), help="1: one each; 0: library defaults"
  )
  p.add_argument("--matmul_n", type=int, default=1024)
  return p.parse_args(argv)


if __name__ == "__main__":
  _ARGS = parse_args()
  if _ARGS.threads == 1:
    # XLA:CPU's matmuls on one thread, like torch's below (set before JAX is imported).
    _flags = os.environ.get("XLA_FLAGS", "").split() + ["--xla_cpu_multi_thread_eigen=false"]
    os.environ["XLA_FLAGS"] = " ".join(_flags)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# train_step.py is imported, not repeated; experiments/ is not a package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import train_step  # noqa: E402

from lmm_align import config_files, hf, sharding  # noqa: E402
from lmm_align.models.config import ModelConfig, RuntimeConfig  # noqa: E402
from lmm_align.models.hf_config import from_hf_config, to_hf_config  # noqa: E402
from lmm_align.models.llava import Llava  # noqa: E402
from lmm_align.models.variants import VARIANTS  # noqa: E402
from lmm_align.trainers import dpo  # noqa: E402
from lmm_align.trainers import state as state_lib  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
IGNORE = -100


# --------------------------------------------------------------------------------------------
# The model and the data.
# --------------------------------------------------------------------------------------------


def save_random_llava(folder: pathlib.Path, config: ModelConfig, seed: int = 0) -> None:
  """A random `LlavaForConditionalGeneration` of our variant's shape (its HF config.json
  through `to_hf_config`) and a processor, saved to `folder`."""
  import torch
  import transformers

  torch.manual_seed(seed)
  hf_config = transformers.LlavaConfig.from_dict(to_hf_config(config))
  transformers.LlavaForConditionalGeneration(hf_config).save_pretrained(folder)
  processor(config).save_pretrained(folder)


def processor(config: ModelConfig):
  """A LlavaProcessor over a word-level tokenizer whose ids are the vocabulary: TRL requires a
  processor for vision data (its pad token and VLM switch); our batches come pre-encoded."""
  import tokenizers
  import transformers

  t, v = config.text, config.vision
  names = {t.pad_token_id: "<pad>", t.bos_token_id: "<s>", t.eos_token_id: "</s>"}
  names[config.image_token_id] = "<image>"
  vocab = {names.get(i, f"t{i}"): i for i in range(t.vocab_size)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
    extra_special_tokens={"image_token": "<image>"},
  )  # fmt: skip
  images = transformers.CLIPImageProcessor(
    size={"shortest_edge": v.image_size}, crop_size={"height": v.image_size, "width": v.image_size}
  )
  return transformers.LlavaProcessor(
    image_processor=images, tokenizer=fast, patch_size=v.patch_size,
    vision_feature_select_strategy=config.vision_feature_select_strategy, image_token="<image>",
    num_additional_image_tokens=1,
  )  # fmt: skip


def pair_batches(
  config: ModelConfig, count: int, pairs: int, prompt_len: int, answer_len: int, seed: int = 0
) -> list[dict[str, np.ndarray]]:
  """`count` batches in our layout: input_ids / labels / attention_mask int32 [B, 2, T] (0
  chosen, 1 rejected; labels IGNORE off the answers), pixel_values float32 [B, 2, 1, H, W, 3]
  (one image per pair, seen by both rows). T = image tokens + prompt_len + answer_len; the
  answers are answer_len / 2 .. answer_len tokens, the last one EOS."""
  rng = np.random.default_rng(seed)
  num_image, v = config.num_image_tokens, config.vision
  seq = num_image + prompt_len + answer_len
  low = max(config.image_token_id, 3) + 1  # ordinary tokens: above pad, bos, eos and <image>
  word = lambda n: rng.integers(low, config.text.vocab_size, n)
  out = []
  for _ in range(count):
    ids = np.full((pairs, 2, seq), config.text.pad_token_id, np.int32)
    labels = np.full((pairs, 2, seq), IGNORE, np.int32)
    mask = np.zeros((pairs, 2, seq), np.int32)
    for b in range(pairs):
      prompt = np.concatenate([np.full(num_image, config.image_token_id), word(prompt_len)])
      for side in range(2):
        answer = np.append(
          word(int(rng.integers(answer_len // 2, answer_len))), config.text.eos_token_id
        )
        row = np.concatenate([prompt, answer])
        ids[b, side, : len(row)] = row
        labels[b, side, len(prompt) : len(row)] = answer
        mask[b, side, : len(row)] = 1
    pixels = rng.standard_normal((pairs, 1, 1, v.image_size, v.image_size, 3), np.float32)
    out.append(
      {"input_ids": ids, "labels": labels, "attention_mask": mask,
       "pixel_values": np.repeat(pixels, 2, axis=1)}
    )  # fmt: skip
  return out


def to_trl(batch: dict[str, np.ndarray]) -> dict:
  """Our [B, 2, ...] pair batch in TRL's layout: [chosen rows; rejected rows], NCHW pixels."""
  import torch

  rows = lambda x: np.concatenate([x[:, 0], x[:, 1]])
  pixels = rows(batch["pixel_values"])[:, 0].transpose(0, 3, 1, 2)
  return {
    "input_ids": torch.from_numpy(rows(batch["input_ids"]).astype(np.int64)),
    "attention_mask": torch.from_numpy(rows(batch["attention_mask"]).astype(np.int64)),
    "completion_mask": torch.from_numpy((rows(batch["labels"]) != IGNORE).astype(np.int64)),
    "pixel_values": torch.from_numpy(np.ascontiguousarray(pixels)),
  }


# --------------------------------------------------------------------------------------------
# The two runs.
# --------------------------------------------------------------------------------------------


def ours_config(lr: float, remat: bool):
  """configs/shapes/dpo.py's DPO block: sigmoid, beta 0.1, reference on the fly, full FT."""
  config = config_files.load_config("configs/shapes/dpo.py:runlocal", str(REPO))
  config.dpo.precompute_reference = False
  config.trainable = (".*",)
  config.model.remat_policy = "full" if remat else "none"
  o = config.optim
  o.lr, o.schedule, o.warmup_steps, o.weight_decay, o.grad_clip_norm = lr, "constant", 0, 0.0, 1.0
  return config


def run_ours(folder: pathlib.Path, batches: list[dict], lr: float, remat: bool) -> dict:
  """Times our jitted DPO step on one CPU device: the first step's seconds, each later step's,
  the losses, and what the FLOPs count needs."""
  config = ours_config(lr, remat)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  rules = tuple(tuple(r) for r in config.mesh.rules)
  runtime = RuntimeConfig(remat_policy=config.model.remat_policy)
  model = Llava(from_hf_config(hf.read_config(folder), runtime))
  with sharding.activation_sharding(mesh, rules):
    shards = state_lib.param_shardings(model, mesh, rules)
    _, params = hf.load_pretrained(folder, runtime=runtime, shardings=shards)
    shapes = jax.eval_shape(lambda: params)  # the state is donated: keep the shapes only
    reference = jax.tree.map(jnp.copy, params)  # a frozen copy; the state's params move
    tx = state_lib.make_optimizer(config, params)
    state, state_shards = state_lib.create_train_state(
      params, shards, tx, tuple(config.trainable), config.seed, mesh, config.optim.state_dtype
    )
    step_fn = jax.tree_util.Partial(
      dpo.dpo_train_step, model=model, reference_model=model, tx=tx,
      trainable=tuple(config.trainable), dpo=config.dpo, state_dtype=config.optim.state_dtype,
    )  # fmt: skip
    frozen = {"base": None, "reference": reference}
    jitted = state_lib.jit_train_step(
      lambda s, b, f: step_fn(s, b, f), state_shards, mesh, {"base": None, "reference": shards}
    )
    losses, ends = [], []
    t0 = time.perf_counter()
    for batch in batches:
      state, metrics = jitted(state, sharding.global_batch_from_local(batch, mesh), frozen)
      losses.append(float(metrics["loss"]))
      ends.append(time.perf_counter())
  return {
    "first_step": ends[0] - t0,
    "step_seconds": np.diff(ends),
    "losses": losses,
    "model_config": model.config,
    "params": shapes,
    "trainable": tuple(config.trainable),
  }


def run_trl(folder: pathlib.Path, batches: list[dict], lr: float, remat: bool) -> dict:
  """Times TRL's DPOTrainer on the same batches: first step's seconds, each later step's, losses."""
  import datasets
  import transformers
  from trl import DPOConfig, DPOTrainer

  class StepClock(transformers.TrainerCallback):
    def __init__(self):
      self.ends, self.losses = [], []

    def on_step_end(self, args, state, control, **kwargs):
      self.ends.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
      if logs and "loss" in logs:
        self.losses.append(float(logs["loss"]))

  # Rows carry only their batch position; "images" marks the data as vision data for TRL.
  pairs = len(batches[0]["input_ids"])
  rows = datasets.Dataset.from_dict(
    {"index": list(range(len(batches) * pairs)), "images": [[]] * (len(batches) * pairs)}
  )

  def collate(examples: list[dict]) -> dict:
    step = examples[0]["index"] // pairs
    if [e["index"] for e in examples] != list(range(step * pairs, (step + 1) * pairs)):
      raise RuntimeError(f"TRL's batch {[e['index'] for e in examples]} is not batch {step}")
    return to_trl(batches[step])

  args = DPOConfig(
    output_dir=str(folder / "trl_run"), per_device_train_batch_size=pairs,
    max_steps=len(batches), learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
    weight_decay=0.0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
    optim="adamw_torch", beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=False,
    gradient_checkpointing=remat, train_sampling_strategy="sequential",
    remove_unused_columns=False, max_length=None, use_cpu=True, bf16=False, logging_steps=1,
    report_to=[], save_strategy="no", dataloader_num_workers=0, disable_tqdm=True, seed=0,
  )  # fmt: skip
  model = transformers.LlavaForConditionalGeneration.from_pretrained(folder)
  processing = transformers.LlavaProcessor.from_pretrained(folder)
  clock = StepClock()
  trainer = DPOTrainer(
    model=model, args=args, data_collator=collate, train_dataset=rows,
    processing_class=processing, callbacks=[clock],
  )  # fmt: skip
  t0 = time.perf_counter()
  trainer.train()
  return {
    "first_step": clock.ends[0] - t0,
    "step_seconds": np.diff(clock.ends),
    "losses": clock.losses,
  }


def dpo_step_flops(result: dict, pairs: int, seq: int) -> float:
  """Policy forward + backward over 2B rows, plus the reference forward (a third of it: every
  part trains, so every part's count is 3 x its forward)."""
  flops = train_step.step_flops(
    result["model_config"], result["params"], result["trainable"], 2 * pairs, seq
  )
  return flops["total"] * 4.0 / 3.0


def main(args: argparse.Namespace) -> float:
  import torch

  if args.threads:
    torch.set_num_threads(args.threads)
  variant = VARIANTS[args.variant]
  batches = pair_batches(variant, args.steps + 1, args.pairs, args.prompt_len, args.answer_len)
  seq = batches[0]["input_ids"].shape[-1]
  tokens = 2 * args.pairs * seq
  print(
    f"model: variant {args.variant}; {args.pairs} pairs x 2 x {seq} tokens per step, "
    f"{args.steps} timed steps after 1 warm-up; DPO sigmoid beta 0.1, reference log-probs "
    f"computed in the step (not precomputed) on both sides; full fine-tune, float32, AdamW, "
    f"remat {'on' if args.remat else 'off'}; torch threads {torch.get_num_threads()}, "
    f"XLA_FLAGS {os.environ.get('XLA_FLAGS', '')!r}"
  )
  with tempfile.TemporaryDirectory(prefix="dpo_vs_trl_") as tmp:
    folder = pathlib.Path(tmp)
    save_random_llava(folder, variant)
    ours = run_ours(folder, batches, args.lr, args.remat)
    trl = run_trl(folder, batches, args.lr, args.remat)
  peak = train_step.matmul_peak_flops(args.matmul_n)
  flops = dpo_step_flops(ours, args.pairs, seq)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ours["params"]))
  print(f"params {n_params:,}; model FLOPs per step {flops / 1e9:.3f} G; CPU matmul peak "
        f"(float32 {args.matmul_n}^2 dot, best of 5) {peak / 1e9:.1f} GFLOP/s")  # fmt: skip
  print("loss per step (lmm_align | trl):")
  for i, (a, b) in enumerate(zip(ours["losses"], trl["losses"])):
    print(f"  {i + 1:3d}  {a:.6f} | {b:.6f}")
  rates = {}
  for name, result in (("lmm_align", ours), ("trl", trl)):
    step = float(np.median(result["step_seconds"]))
    rates[name] = tokens / step
    print(
      f"{name:10s} first step {result['first_step']:.2f} s; step median {step * 1e3:.1f} ms "
      f"(mean {np.mean(result['step_seconds']) * 1e3:.1f}); "
      f"tokens/s {rates[name]:.0f}; MFU {100 * flops / step / peak:.2f}%"
    )
  ratio = rates["lmm_align"] / rates["trl"]
  print(f"lmm_align / trl: {ratio:.2f}")
  return ratio


if __name__ == "__main__":
  main(_ARGS)
