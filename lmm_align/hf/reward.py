"""A reward (or value) model on disk: an HF LLaVA / LLaMA folder plus the scalar head.

Layout (the backbone folder is a plain HF model; transformers loads it without the head):

  OUT/config.json, OUT/model*.safetensors, tokenizer / processor files   the backbone
  OUT/reward_head.safetensors   "weight": float32 [1, D], "bias": float32 [1]
                                (torch.nn.Linear(D, 1) layout: `head.load_state_dict(...)`)
  OUT/reward_model.json         how the model was trained to be read: fact_augmented, the
                                evaluation prompt appended after the response, where the
                                facts go (facts_position), the score position ("last_token")

To score in PyTorch: run the backbone on `conversation + response + prompt`, with the question
and the prompt as `lmm_align.data.reward_data.reward_texts` makes them (the facts under the
question or in the prompt's `{factual_prompt}`), take the final hidden state (after the last
norm) at the last real token, apply the Linear head.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from lmm_align.hf import checkpoint as hf_checkpoint
from lmm_align.models.config import RuntimeConfig
from lmm_align.models.llava import Llava

HEAD_FILE = "reward_head.safetensors"
INFO_FILE = "reward_model.json"


@dataclasses.dataclass
class RewardModel:
  model: Llava
  backbone: Any  # the Llava params
  head: dict[str, Any]  # ScalarHead params: kernel [D], bias []
  fact_augmented: bool
  prompt: str  # the evaluation prompt appended after the response
  # where the facts are read (reward_data.FACTS_POSITIONS); exports that predate it: after
  facts_position: str = "after_response"
  # the sentence above the facts, as the model was trained with it (reward.fact_lead_in);
  # None: reward_data.DEFAULT_FACT_LEAD_IN, which exports that predate it used
  fact_lead_in: str | None = None


def save_reward_model(
  model: Llava,
  backbone: Any,
  head: dict[str, Any],
  out_dir: str,
  *,
  fact_augmented: bool,
  prompt: str,
  facts_position: str = "after_response",
  fact_lead_in: str | None = None,
  tokenizer: Any = None,
  processor: Any = None,
) -> pathlib.Path:
  out = hf_checkpoint.save_pretrained(
    model, backbone, out_dir, tokenizer=tokenizer, processor=processor
  )
  kernel = np.asarray(jax.device_get(head["kernel"]), np.float32)
  bias = np.asarray(jax.device_get(head["bias"]), np.float32)
  save_file(
    {"weight": kernel[None, :], "bias": bias.reshape(1)},
    str(out / HEAD_FILE),
    metadata={"format": "pt"},
  )
  info = {
    "fact_augmented": fact_augmented,
    "prompt": prompt,
    "facts_position": facts_position,
    "fact_lead_in": fact_lead_in,
    "score_position": "last_token",
  }
  (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
  return out


def load_reward_model(
  path: str, runtime: RuntimeConfig | None = None, shardings: Any = None
) -> RewardModel:
  """The backbone (see hf.load_pretrained), the head and how to prompt it."""
  folder = pathlib.Path(path)
  for name in (HEAD_FILE, INFO_FILE):
    if not (folder / name).exists():
      raise hf_checkpoint.CheckpointError(
        f"{folder / name} not found: {folder} is not a reward model written by "
        "`lmm-align export` of a reward run"
      )
  model, backbone = hf_checkpoint.load_pretrained(folder, runtime=runtime, shardings=shardings)
  tensors = load_file(str(folder / HEAD_FILE))
  hidden = model.config.text.hidden_size
  if tensors.get("weight", np.zeros(0)).shape != (1, hidden) or tensors.get(
    "bias", np.zeros(0)
  ).shape != (1,):
    raise hf_checkpoint.CheckpointError(
      f"{folder / HEAD_FILE}: expected weight [1, {hidden}] and bias [1], got "
      f"{ {k: v.shape for k, v in tensors.items()} }"
    )
  head = {"kernel": tensors["weight"][0], "bias": tensors["bias"][0]}
  info = json.loads((folder / INFO_FILE).read_text())
  return RewardModel(
    model, backbone, head, bool(info["fact_augmented"]), info["prompt"],
    info.get("facts_position", "after_response"), info.get("fact_lead_in"),
  )  # fmt: skip
