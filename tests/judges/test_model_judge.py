"""ModelJudge on a tiny random LLaVA: replies equal `sampling.generate` called directly, and
batching (with a padded last batch) does not change them."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lmm_align import sampling
from lmm_align.data import conversation
from lmm_align.data.images import ImageProcessorConfig, load_image, preprocess_image
from lmm_align.data.tokenizer import train_bpe_tokenizer
from lmm_align.judges.base import JudgeRequest
from lmm_align.judges.model import ModelJudge
from lmm_align.models import Llava, get_variant, init_params
from lmm_align.shapes import world as shapes

MAX_NEW = 6
BUCKETS = (256,)  # every prompt here fits one bucket: one compilation per batch size
TEMPLATE = "vicuna_v1"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  config = get_variant("tiny")
  params = init_params(config, jax.random.key(0))
  template = conversation.get_template(TEMPLATE)
  corpus = [
    template.system,
    "USER: ASSISTANT: Which response is better? The better response: first",
  ] * 4
  tokenizer = train_bpe_tokenizer(corpus, vocab_size=300)
  image_config = ImageProcessorConfig(size=32, crop_size=32)
  folder = tmp_path_factory.mktemp("images")
  world = shapes.ShapesWorldConfig(image_size=48)
  paths = []
  for i, scene in enumerate(shapes.make_scenes(2, world, seed=3)):
    paths.append(str(folder / f"{i}.png"))
    shapes.render(scene, 48).save(paths[-1])
  requests = [
    JudgeRequest("<image>\nWhich response is better?", image=paths[0], max_tokens=MAX_NEW),
    JudgeRequest("Is the first response better?", max_tokens=3),  # text only, shorter limit
    JudgeRequest("Score the response.", image=paths[1], max_tokens=MAX_NEW),  # <image> added
  ]
  return Llava(config), params, tokenizer, image_config, requests


def _judge(setup, batch_size):
  model, params, tokenizer, image_config, _ = setup
  return ModelJudge(model, params, tokenizer, image_config, template=TEMPLATE,
                    batch_size=batch_size, max_new_tokens=MAX_NEW, buckets=BUCKETS)  # fmt: skip


def test_replies_equal_generate_called_directly(setup):
  model, params, tokenizer, image_config, requests = setup
  config = model.config
  prompts = [
    conversation.encode_generation_prompt(
      r.prompt,
      tokenizer,
      TEMPLATE,
      config.num_image_tokens,
      config.image_token_id,
      with_image=r.image is not None,
    ).input_ids  # fmt: skip
    for r in requests
  ]
  assert [int(np.sum(p == config.image_token_id)) for p in prompts] == [16, 0, 16]
  pixels = np.stack(
    [preprocess_image(load_image(r.image), image_config) for r in requests if r.image]
  )
  settings = sampling.SamplingSettings(
    temperature=0.0, max_new_tokens=MAX_NEW, stop_token_ids=(tokenizer.eos_token_id,)
  )
  out = sampling.generate(model, params, prompts, pixels, settings=settings, rng=None,
                          pad_id=tokenizer.pad_token_id, buckets=BUCKETS,
                          row_max_new_tokens=[MAX_NEW, 3, MAX_NEW])  # fmt: skip
  expected = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in out.token_lists()]
  assert max(map(len, out.token_lists())) > 0
  assert len(out.token_lists()[1]) <= 3

  replies = _judge(setup, batch_size=2).complete(requests)  # batches of 2 and 1 (+1 padding row)
  assert all(r.ok for r in replies)
  assert [r.text for r in replies] == expected

  one_by_one = _judge(setup, batch_size=1)
  assert [one_by_one.complete([r])[0].text for r in requests] == expected


def test_bad_requests_become_error_replies(setup, tmp_path):
  requests = setup[4]
  judge = _judge(setup, batch_size=2)
  bad = [
    JudgeRequest("<image>\nNo image given", request_id="no-image"),
    JudgeRequest("Describe.", image=str(tmp_path / "missing.png"), request_id="missing"),
  ]
  replies = judge.complete([bad[0], requests[1], bad[1]])
  assert not replies[0].ok and "no-image" in replies[0].error and "placeholders" in replies[0].error
  assert (
    not replies[2].ok and "missing" in replies[2].error and "cannot read image" in replies[2].error
  )
  assert replies[1].ok and replies[1].text == judge.complete([requests[1]])[0].text


def test_system_prompt_replaces_the_template_system(setup):
  model, params, tokenizer, image_config, requests = setup
  judge = _judge(setup, batch_size=2)
  prepared = judge._prepare(0, JudgeRequest("Which is better?", system="You are a strict judge."))
  text = tokenizer.decode(prepared.input_ids, skip_special_tokens=True)
  assert text.startswith("You are a strict judge. USER: Which is better? ASSISTANT:")
