"""LLaVA-Critic as an in-process judge, end to end on a tiny SigLIP + Qwen2 LLaVA: the model
card's prompts in the qwen_1_5 template reach the sampler as the reference tokenizes them
(LLaVA-NeXT's preprocess_qwen chat template), replies are greedy and stop at <|im_end|>, and
both orders of a pair are judged and combined by the swap rule."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lmm_align import sampling
from lmm_align.data.images import ImageProcessorConfig, load_image, preprocess_image
from lmm_align.data.tokenizer import train_bpe_tokenizer
from lmm_align.feedback import critic
from lmm_align.judges.base import JudgeRequest
from lmm_align.judges.verdicts import parse_pairwise, parse_pointwise
from lmm_align.models import Llava, get_variant, init_params
from lmm_align.shapes import world as shapes

MAX_NEW = 5
BUCKETS = (256,)  # every prompt here fits: one compilation for the module
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
QUESTION = "What is in the image?"
RESPONSES = ("A red circle.", "A blue square and a green triangle.")
# LLaVA-NeXT's preprocess_qwen chat template (llava/train/train.py): the reference tokenization.
NEXT_QWEN_JINJA = (
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
  "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
  "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  config = get_variant("tiny-siglip-qwen2")
  params = init_params(config, jax.random.key(0))
  corpus = [
    critic.pairwise_prompt(QUESTION, *RESPONSES, template=critic.LLAVA_CRITIC_PAIRWISE),
    critic.pointwise_prompt(QUESTION, RESPONSES[0], template=critic.LLAVA_CRITIC_POINTWISE),
    "system\nYou are a helpful assistant. user assistant The better response: [first]",
  ] * 4
  tokenizer = train_bpe_tokenizer(corpus, vocab_size=400)
  tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
  assert tokenizer.image_token_id == config.image_token_id and len(tokenizer) <= 512
  image_config = ImageProcessorConfig(size=32, crop_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
  path = str(tmp_path_factory.mktemp("images") / "scene.png")
  world = shapes.ShapesWorldConfig(image_size=48)
  shapes.render(shapes.make_scenes(1, world, seed=3)[0], 48).save(path)
  judge = critic.llava_critic_judge(
    Llava(config), params, tokenizer, image_config, batch_size=2, max_new_tokens=MAX_NEW,
    buckets=BUCKETS,
  )  # fmt: skip
  return judge, tokenizer, image_config, path


def _reference_ids(tokenizer, prompt, num_image_tokens):
  """The card's prompt as LLaVA-NeXT tokenizes it: system turn + user turn with the assistant
  header, "<image>" (one special id) expanded to the tower's patch count."""
  ids = tokenizer.apply_chat_template(
    [{"role": "system", "content": "You are a helpful assistant."}],
    chat_template=NEXT_QWEN_JINJA, return_dict=False,
  ) + tokenizer.apply_chat_template(
    [{"role": "user", "content": prompt}], chat_template=NEXT_QWEN_JINJA,
    add_generation_prompt=True, return_dict=False,
  )  # fmt: skip
  image_id = tokenizer.image_token_id
  assert ids.count(image_id) == 1
  at = ids.index(image_id)
  return ids[:at] + [image_id] * num_image_tokens + ids[at + 1 :]


def _greedy(judge, tokenizer, image_config, path, prompts):
  config = judge.model.config
  ids = [_reference_ids(tokenizer, p, config.num_image_tokens) for p in prompts]
  pixels = np.stack([preprocess_image(load_image(path), image_config)] * len(prompts))
  stop = tuple(tokenizer.convert_tokens_to_ids(t) for t in (IM_END,)) + (tokenizer.eos_token_id,)
  settings = sampling.SamplingSettings(temperature=0.0, max_new_tokens=MAX_NEW, stop_token_ids=stop)
  out = sampling.generate(judge.model, judge.params, ids, pixels[:, None], settings=settings,
                          rng=None, pad_id=tokenizer.pad_token_id, buckets=BUCKETS,
                          row_max_new_tokens=[MAX_NEW] * len(prompts))  # fmt: skip
  assert all(out.token_lists())  # the tiny model says something before stopping
  return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in out.token_lists()]


def test_pairwise_both_orders_equal_generate_on_the_reference_prompts(setup):
  judge, tokenizer, image_config, path = setup
  assert judge.stop_token_ids == (tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id)
  prompts = [
    critic.pairwise_prompt(QUESTION, a, b, template=critic.LLAVA_CRITIC_PAIRWISE)
    for a, b in (RESPONSES, RESPONSES[::-1])
  ]
  expected = _greedy(judge, tokenizer, image_config, path, prompts)
  winner, original, swapped = critic.judge_both_orders(
    judge, QUESTION, *RESPONSES, image=path, template=critic.LLAVA_CRITIC_PAIRWISE
  )
  assert (original, swapped) == tuple(parse_pairwise(t) for t in expected)
  assert winner == critic.debiased_winner(original, swapped)
  # The prompt the judge built is the reference's, token for token.
  prepared = judge._prepare(0, JudgeRequest(prompts[0], image=path))
  assert prepared.input_ids == _reference_ids(
    tokenizer, prompts[0], judge.model.config.num_image_tokens
  )


def test_pointwise_scores_equal_generate(setup):
  judge, tokenizer, image_config, path = setup
  prompts = [
    critic.pointwise_prompt(QUESTION, r, template=critic.LLAVA_CRITIC_POINTWISE) for r in RESPONSES
  ]
  expected = _greedy(judge, tokenizer, image_config, path, prompts)
  result = critic.pointwise_scores(
    judge, QUESTION, list(RESPONSES), image=path, template=critic.LLAVA_CRITIC_POINTWISE
  )
  assert result.verdicts == [parse_pointwise(t, low=0, high=100) for t in expected]
  assert result.invalid == sum(s is None for s in result.scores)
