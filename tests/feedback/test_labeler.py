"""The one-forward-pass labeler: p_yes / p_no equal a numpy softmax of the model's own logits
(full forward, one unpadded question at a time), whatever the padding side and batch size."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from lmm_align.data import conversation
from lmm_align.data.images import ImageProcessorConfig, preprocess_image
from lmm_align.data.tokenizer import train_bpe_tokenizer
from lmm_align.feedback import labeler
from lmm_align.models import Llava, get_variant, init_params

TEMPLATE = "vicuna_v1"
QUESTIONS = [
  "Is there a red circle?",
  "Is the blue square on the left of the image?",
  "Is there a cat?",
  "Is the circle red?",
]


@pytest.fixture(scope="module")
def setup():
  """A tiny random LLaVA, a BPE tokenizer in which " yes"/" Yes"/" no"/" No" are single
  tokens, two random images and one question without an image."""
  tmpl = conversation.get_template(TEMPLATE)
  corpus = [tmpl.system, *QUESTIONS] + [f"USER: Is it? ASSISTANT: {w}" for w in [" yes", " Yes", " no", " No"] * 30]  # fmt: skip
  tokenizer = train_bpe_tokenizer(corpus, 320)
  config = get_variant("tiny")
  params = init_params(config, jax.random.key(0))
  rs = np.random.RandomState(0)
  pictures = [Image.fromarray(rs.randint(0, 255, (40, 32, 3), np.uint8)) for _ in range(2)]
  images = [pictures[0], pictures[1], None, pictures[0]]
  image_config = ImageProcessorConfig(size=32, crop_size=32)
  return config, params, tokenizer, image_config, images


def _labeler(setup, **kwargs):
  config, params, tokenizer, image_config, _ = setup
  return labeler.YesNoLabeler(
    config, params, tokenizer, image_config, template=TEMPLATE, **{"batch_size": 2, **kwargs}
  )


@pytest.fixture(scope="module")
def reference(setup):
  """(p_yes, p_no) per question: one unpadded question per forward, full logits, numpy."""
  config, params, tokenizer, image_config, images = setup
  lab = _labeler(setup)
  ids = lab.answer_tokens
  forward = jax.jit(lambda x, px: Llava(config).apply({"params": params}, x, px).logits)
  out = []
  for question, image in zip(QUESTIONS, images):
    prompt = np.asarray([lab.encode(question, image is not None)], np.int32)
    pixels = None if image is None else preprocess_image(image, image_config)[None]
    logits = np.asarray(forward(jnp.asarray(prompt), pixels), np.float64)[0, -1]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    out.append((probs[list(ids.yes_ids)].sum(), probs[list(ids.no_ids)].sum()))
  return np.asarray(out)


def test_answer_token_ids(setup):
  tokenizer = setup[2]
  ids = labeler.answer_token_ids(tokenizer)
  single = lambda w: tokenizer.encode(w, add_special_tokens=False)
  assert ids.yes_ids == (single(" yes")[0], single(" Yes")[0])
  assert ids.no_ids == (single(" no")[0], single(" No")[0])
  assert all(len(single(w)) == 1 for w in (" yes", " Yes", " no", " No"))
  with pytest.raises(ValueError, match="' Absolutely' is .* tokens"):
    labeler.answer_token_ids(tokenizer, yes_words=("yes", "Absolutely"))
  with pytest.raises(ValueError, match="share an id"):
    labeler.answer_token_ids(tokenizer, yes_words=("yes",), no_words=("no", "yes"))


def test_prompt_is_the_generation_prompt(setup):
  config, _, tokenizer, _, _ = setup
  lab = _labeler(setup, question_suffix=" Answer yes or no.")
  expected = conversation.encode_generation_prompt(
    "Is there a cat? Answer yes or no.", tokenizer, TEMPLATE, config.num_image_tokens, 4
  )
  assert lab.encode("Is there a cat?", True) == expected.input_ids.tolist()
  assert lab.encode("Is there a cat?", False).count(config.image_token_id) == 0


def test_scores_equal_softmax_of_full_forward(setup, reference):
  images = setup[4]
  scores = _labeler(setup).score(QUESTIONS, images)
  np.testing.assert_allclose(scores.p_yes, reference[:, 0], rtol=2e-5, atol=1e-9)
  np.testing.assert_allclose(scores.p_no, reference[:, 1], rtol=2e-5, atol=1e-9)
  np.testing.assert_array_equal(scores.rejected, reference[:, 1] >= reference[:, 0])
  # The image matters: the same question about the other picture scores differently.
  swapped = _labeler(setup).score(QUESTIONS[:2], images[1::-1])
  assert not np.allclose(swapped.p_yes, scores.p_yes[:2], rtol=1e-4)


@pytest.mark.parametrize("padding_side, batch_size", [("left", 2), ("right", 3)])
def test_padding_and_batching_do_not_change_scores(setup, reference, padding_side, batch_size):
  images = setup[4]
  lab = _labeler(setup, padding_side=padding_side, batch_size=batch_size)
  scores = lab.score(QUESTIONS, images)
  np.testing.assert_allclose(scores.p_yes, reference[:, 0], rtol=2e-5, atol=1e-9)
  np.testing.assert_allclose(scores.p_no, reference[:, 1], rtol=2e-5, atol=1e-9)
  reversed_scores = lab.score(QUESTIONS[::-1], images[::-1])
  np.testing.assert_allclose(reversed_scores.p_yes[::-1], scores.p_yes, rtol=1e-6)


def test_one_compilation_per_bucket(setup):
  lab = _labeler(setup, batch_size=3)  # the shapes of a test above: no compilation here
  images = setup[4]
  lab.score(QUESTIONS, images)
  compiled = labeler.jit_last_position_yes_no._cache_size()
  lab.score(QUESTIONS[:1] * 7, images[:1] * 7)  # another batch count, same bucket and shape
  assert labeler.jit_last_position_yes_no._cache_size() == compiled
  assert lab.score([], []).p_yes.shape == (0,)


def test_bad_input_is_refused(setup):
  config, params, tokenizer, _, images = setup
  with pytest.raises(ValueError, match="2 questions but 1 images"):
    _labeler(setup).score(QUESTIONS[:2], images[:1])
  with pytest.raises(ValueError, match="needs an image_config"):
    labeler.YesNoLabeler(config, params, tokenizer, None, template=TEMPLATE)
  with pytest.raises(ValueError, match="padding side"):
    labeler.pad_rows([[1, 2]], 4, 0, "middle")
