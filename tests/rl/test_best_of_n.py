"""Best-of-N on a tiny random LLaVA: scores equal direct forwards (the reward head at the last
token; the implicit reward in numpy from full logits), the argmax is chosen, N = 1 is plain
sampling, ties go to the first candidate, and the shapes experiment runs end to end."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest
from scipy.special import log_softmax

from lmm_align import sampling
from lmm_align.data import conversation, reward_data
from lmm_align.data.images import ImageProcessorConfig, preprocess_image
from lmm_align.data.tokenizer import train_bpe_tokenizer
from lmm_align.hf.reward import RewardModel
from lmm_align.models import Llava, get_variant
from lmm_align.models.llava import dummy_inputs
from lmm_align.rl import best_of_n as bon
from lmm_align.shapes import world as shapes
from lmm_align.shapes.data import scene_facts

TEMPLATE = "vicuna_v1"
N, MAX_NEW, BETA, FACT_SEED = 3, 6, 0.1, 11
LEAD_IN = "Facts:\n"  # a lead-in of its own, not the default
PROMPT_BUCKETS = (64,)
SCORE_BUCKETS = (128, 512)  # one bucket for implicit-reward rows, one for reward-model rows
SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "shapes_best_of_n.py"


def _tokenizer():
  tmpl = conversation.get_template(TEMPLATE)
  records = shapes.make_sft_records(40, shapes.ShapesWorldConfig(image_size=48), seed=1)
  corpus = [tmpl.system, reward_data.DEFAULT_FACT_PROMPT, reward_data.DEFAULT_FACT_LEAD_IN] * 2
  for r in records:
    corpus.append(conversation.render_conversation(r["conversations"], tmpl))
    corpus.append(" ".join(scene_facts(shapes.Scene.from_dict(r["metadata"]["scene"]))))
  return train_bpe_tokenizer(corpus, vocab_size=512)  # = the tiny variant's vocabulary


def _random_params(config, seed: int) -> dict:
  """Random weights of the right shapes without compiling `init` (eval_shape only traces it)."""
  model = Llava(config)
  shapes_tree = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *dummy_inputs(config)))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    if path[-1].key == "scale":  # norm scales near one
      return 1.0 + 0.1 * noise
    return 0.05 * noise

  return jax.tree_util.tree_map_with_path(fill, shapes_tree["params"])


@pytest.fixture(scope="module")
def setup():
  tokenizer = _tokenizer()
  config = get_variant("tiny")
  assert len(tokenizer) == config.text.vocab_size
  model = Llava(config)
  policy = _random_params(config, seed=0)
  rng = np.random.default_rng(0)
  # A "trained" policy's reference: the same model, every weight moved a little.
  reference = jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(np.float32), policy)
  head = {
    "kernel": rng.normal(size=config.text.hidden_size).astype(np.float32),
    "bias": np.float32(0.25),
  }
  prompt_text = reward_data.load_reward_prompt(None, fact_augmented=True)
  rm = RewardModel(model, policy, head, fact_augmented=True, prompt=prompt_text)
  image_config = ImageProcessorConfig(size=32, crop_size=32)
  prompts = []
  # At most 3 objects: every reward-model row fits the 512 bucket.
  world = shapes.ShapesWorldConfig(image_size=48, max_objects=3)
  for scene in shapes.make_scenes(2, world, seed=5):
    ids = conversation.encode_generation_prompt(
      "Describe the image.", tokenizer, TEMPLATE, config.num_image_tokens, config.image_token_id
    ).input_ids
    pixels = preprocess_image(shapes.render(scene, 48), image_config)
    prompts.append(bon.BestOfNPrompt(scene.id, ids, pixels, tuple(scene_facts(scene))))
  settings = sampling.SamplingSettings(
    temperature=1.0, max_new_tokens=MAX_NEW, stop_token_ids=(tokenizer.eos_token_id,)
  )
  key = jax.random.key(42)
  candidates = bon.sample_candidates(
    model, policy, prompts, tokenizer, n=N, settings=settings, rng=key, buckets=PROMPT_BUCKETS
  )
  return dict(
      tokenizer=tokenizer, model=model, policy=policy, reference=reference, rm=rm,
      prompts=prompts, settings=settings, key=key, candidates=candidates,
  )  # fmt: skip


def _valid(candidates, p, k, image_token_id) -> bool:
  return image_token_id not in candidates.tokens[p][k]


# --------------------------------------------------------------------------------------------
# Direct references: each row alone, unmasked and right-padded to one length (causal attention:
# the pad after a row cannot change its positions), arithmetic in numpy.
# --------------------------------------------------------------------------------------------

DIRECT_LENGTH = 512


@jax.jit
def _forward(params, ids, pixels):
  out = Llava(get_variant("tiny")).apply({"params": params}, ids, pixel_values=pixels)
  return out.hidden_states, out.logits


def _direct(params, ids, pixels) -> tuple[np.ndarray, np.ndarray]:
  """(hidden [T, D], logits [T, V]) of one row, float64."""
  padded = np.zeros((1, DIRECT_LENGTH), np.int32)
  padded[0, : len(ids)] = ids
  hidden, logits = _forward(params, padded, np.asarray(pixels)[None])
  return np.asarray(hidden[0, : len(ids)], np.float64), np.asarray(
    logits[0, : len(ids)], np.float64
  )


def _direct_rm_score(rm, ids, pixels) -> float:
  hidden, _ = _direct(rm.backbone, ids, pixels)
  return float(hidden[-1] @ np.asarray(rm.head["kernel"], np.float64) + float(rm.head["bias"]))


def _direct_logp(params, prompt_ids, response, pixels) -> float:
  ids = np.concatenate([prompt_ids, response]).astype(np.int32)
  logp = log_softmax(_direct(params, ids, pixels)[1], axis=-1)
  return float(sum(logp[t - 1, ids[t]] for t in range(len(prompt_ids), len(ids))))


# --------------------------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------------------------


def test_reward_model_best_of_n_picks_the_argmax_of_the_head_at_the_last_token(setup):
  s = setup
  rm, tok, prompts, candidates = s["rm"], s["tokenizer"], s["prompts"], s["candidates"]
  scorer = bon.RewardModelScorer(rm, tok, fact_seed=FACT_SEED, batch_size=4, buckets=SCORE_BUCKETS)
  results = bon.best_of_n(
    s["model"], s["policy"], prompts, tok, scorer, n=N, settings=s["settings"], rng=s["key"],
    buckets=PROMPT_BUCKETS,
  )  # fmt: skip
  image_id = rm.model.config.image_token_id
  for p, (prompt, result) in enumerate(zip(prompts, results)):
    assert result.candidates == candidates.texts[p]  # same key: the same samples
    suffix = reward_data.reward_suffix(
      rm.prompt, list(prompt.facts), np.random.default_rng([FACT_SEED, p]), fact_augmented=True
    )
    tail = reward_data.suffix_ids(suffix, tok)
    expected = np.array([
      _direct_rm_score(rm, [*prompt.input_ids, *tokens, *tail], prompt.pixel_values)
      if _valid(candidates, p, k, image_id) else -np.inf
      for k, tokens in enumerate(candidates.tokens[p])
    ])  # fmt: skip
    np.testing.assert_allclose(result.scores, expected, rtol=1e-4, atol=1e-4)
    assert result.chosen_index == int(np.argmax(expected))
    assert result.chosen_text == candidates.texts[p][result.chosen_index]
  finite = np.concatenate([r.scores[np.isfinite(r.scores)] for r in results])
  assert len(finite) >= 2 and np.ptp(finite) > 1e-3  # the choice is not decided by ties


def test_implicit_reward_is_the_length_normalised_log_ratio_of_direct_logits(setup):
  s = setup
  model, prompts, candidates = s["model"], s["prompts"], s["candidates"]
  scorer = bon.ImplicitRewardScorer(
    model, s["policy"], s["reference"], pad_id=s["tokenizer"].pad_token_id, beta=BETA,
    batch_size=4, buckets=SCORE_BUCKETS,
  )  # fmt: skip
  scores = scorer(prompts, candidates)
  results = bon.select_best(prompts, candidates, scores)
  for p, prompt in enumerate(prompts):
    expected = []
    for k, tokens in enumerate(candidates.tokens[p]):
      if not _valid(candidates, p, k, model.config.image_token_id):
        expected.append(-np.inf)
        continue
      args = (prompt.input_ids, np.asarray(tokens), prompt.pixel_values)
      log_ratio = _direct_logp(s["policy"], *args) - _direct_logp(s["reference"], *args)
      expected.append(BETA / len(tokens) * log_ratio)
    np.testing.assert_allclose(scores[p], expected, rtol=1e-4, atol=1e-4)
    assert results[p].chosen_index == int(np.argmax(expected))


def test_n_equal_one_is_plain_sampling_with_the_prompt_key(setup):
  s = setup
  tok, prompts = s["tokenizer"], s["prompts"]
  results = bon.best_of_n(
    s["model"], s["policy"], prompts, tok, lambda ps, c: np.zeros(c.shape), n=1,
    settings=s["settings"], rng=s["key"], buckets=PROMPT_BUCKETS,
  )  # fmt: skip
  for p, prompt in enumerate(prompts):
    out = sampling.generate(
      s["model"], s["policy"], [prompt.input_ids], prompt.pixel_values[None],
      settings=s["settings"], rng=jax.random.fold_in(s["key"], p), pad_id=tok.pad_token_id,
      buckets=PROMPT_BUCKETS,
    )  # fmt: skip
    text = tok.decode(out.token_lists()[0], skip_special_tokens=True).strip()
    assert results[p].candidates == [text] and results[p].chosen_text == text


def test_ties_go_to_the_first_candidate_and_nan_names_the_prompt(setup):
  prompts = setup["prompts"]
  candidates = bon.Candidates(
    tokens=[[[7], [8], [9]], [[7], [8], [9]]],
    texts=[["a", "b", "c"], ["d", "e", "f"]],
    stopped=np.zeros((2, 3), bool),
  )
  results = bon.select_best(prompts, candidates, np.array([[1.0, 3.0, 3.0], [-np.inf] * 3]))
  assert [r.chosen_index for r in results] == [1, 0]
  assert [r.chosen_text for r in results] == ["b", "d"]
  with pytest.raises(ValueError, match=f"prompt {prompts[1].prompt_id!r}.*candidates \\[2\\]"):
    bon.select_best(prompts, candidates, np.array([[0.0, 1.0, 2.0], [0.0, 1.0, np.nan]]))
  with pytest.raises(ValueError, match="must agree"):
    bon.select_best(prompts, candidates, np.zeros((2, 2)))


def test_a_response_holding_the_image_placeholder_is_scored_minus_inf(setup):
  s = setup
  tok, prompts, config = s["tokenizer"], s["prompts"][:1], s["model"].config
  text = tok.encode(" A red circle.", add_special_tokens=False)
  candidates = bon.Candidates(
    tokens=[[[*text, tok.eos_token_id], [*text, config.image_token_id, tok.eos_token_id]]],
    texts=[["A red circle.", "A red circle."]],
    stopped=np.ones((1, 2), bool),
  )
  rm_scores = bon.RewardModelScorer(s["rm"], tok, batch_size=4, buckets=SCORE_BUCKETS)(
    prompts, candidates
  )
  implicit = bon.ImplicitRewardScorer(
    s["model"],
    s["policy"],
    s["reference"],
    pad_id=tok.pad_token_id,
    batch_size=4,
    buckets=SCORE_BUCKETS,
  )(prompts, candidates)
  for scores in (rm_scores, implicit):
    assert np.isfinite(scores[0, 0]) and scores[0, 1] == -np.inf
    assert bon.select_best(prompts, candidates, scores)[0].chosen_index == 0


def test_bad_inputs_are_refused_with_clear_errors(setup):
  s = setup
  tok, prompts = s["tokenizer"], s["prompts"]
  no_facts = [prompts[0], bon.BestOfNPrompt("bare", prompts[1].input_ids, prompts[1].pixel_values)]
  with pytest.raises(ValueError, match="prompt 'bare', field 'facts'"):
    bon.RewardModelScorer(s["rm"], tok)(no_facts, s["candidates"])
  greedy = sampling.SamplingSettings(temperature=0.0, max_new_tokens=2)
  with pytest.raises(ValueError, match="identical candidates"):
    bon.sample_candidates(s["model"], s["policy"], prompts, tok, n=2, settings=greedy, rng=None)
  with pytest.raises(ValueError, match="row 0: 0 image placeholder ids"):
    bon.reward_model_scores(s["rm"], [[1, 5, 6]], [prompts[0].pixel_values], pad_id=0)
  with pytest.raises(ValueError, match="T = 0"):
    bon.implicit_rewards(
      s["model"], s["policy"], s["reference"], [prompts[0].input_ids], [[]],
      [prompts[0].pixel_values], beta=0.1, pad_id=0,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# The experiment, end to end on exported tiny folders.
# --------------------------------------------------------------------------------------------


def _experiment():
  spec = importlib.util.spec_from_file_location("shapes_best_of_n", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_an_rm_reading_its_facts_under_the_question_scores_its_own_query(setup, tmp_path):
  """Saved and loaded with its facts_position and fact lead-in, it scores prompt + facts (under
  its own lead-in), then each candidate and the request without facts, as a direct forward
  pass of that row does."""
  from lmm_align.hf.reward import INFO_FILE, load_reward_model, save_reward_model

  s = setup
  model, tok, rm, candidates = s["model"], s["tokenizer"], s["rm"], s["candidates"]
  folder = tmp_path / "rm"
  save_reward_model(model, rm.backbone, rm.head, str(folder), fact_augmented=True,
                    prompt=rm.prompt, facts_position="before_response", fact_lead_in=LEAD_IN,
                    tokenizer=tok)  # fmt: skip
  loaded = load_reward_model(str(folder))
  assert loaded.facts_position == "before_response" and loaded.prompt == rm.prompt
  assert loaded.fact_lead_in == LEAD_IN
  prompts = [dataclasses.replace(p, question="Describe the image.") for p in s["prompts"][:1]]
  scorer = bon.RewardModelScorer(loaded, tok, fact_seed=FACT_SEED, buckets=SCORE_BUCKETS)
  one = bon.Candidates([candidates.tokens[0]], [candidates.texts[0]], candidates.stopped[:1])
  scores = scorer(prompts, one)[0]
  question, suffix = reward_data.reward_texts(
    "Describe the image.", rm.prompt, list(prompts[0].facts),
    np.random.default_rng([FACT_SEED, 0]), fact_augmented=True, facts_position="before_response",
    lead_in=LEAD_IN,
  )  # fmt: skip
  assert question.startswith("Describe the image.\n" + LEAD_IN) and "{factual_prompt}" not in suffix
  config = model.config
  query = conversation.encode_generation_prompt(
    question, tok, TEMPLATE, config.num_image_tokens, config.image_token_id
  ).input_ids
  tail = reward_data.suffix_ids(suffix, tok)
  image_id = config.image_token_id
  expected = np.array([
    _direct_rm_score(loaded, [*query, *tokens, *tail], prompts[0].pixel_values)
    if _valid(candidates, 0, k, image_id) else -np.inf
    for k, tokens in enumerate(candidates.tokens[0])
  ])  # fmt: skip
  np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="'question': none"):
    scorer(s["prompts"][:1], one)
  info = json.loads((folder / INFO_FILE).read_text())
  del info["facts_position"], info["fact_lead_in"]  # an export written before the settings
  (folder / INFO_FILE).write_text(json.dumps(info))
  old = load_reward_model(str(folder))
  assert (old.facts_position, old.fact_lead_in) == ("after_response", None)
  assert bon.RewardModelScorer(old, tok).lead_in is None  # -> reward_data.DEFAULT_FACT_LEAD_IN


def test_shapes_best_of_n_experiment_runs_on_exported_folders(setup, tmp_path):
  from lmm_align.hf.checkpoint import save_pretrained
  from lmm_align.hf.reward import save_reward_model

  s = setup
  model, tok, rm = s["model"], s["tokenizer"], s["rm"]
  save_pretrained(model, s["policy"], tmp_path / "policy", tokenizer=tok)
  save_pretrained(model, s["reference"], tmp_path / "reference", tokenizer=tok)
  save_reward_model(model, rm.backbone, rm.head, str(tmp_path / "rm"), fact_augmented=True,
                    prompt=rm.prompt, tokenizer=tok)  # fmt: skip
  # The image preprocessing an export writes (without building a transformers processor).
  processor = json.dumps(ImageProcessorConfig(size=32, crop_size=32).to_hf_dict())
  for folder in ("policy", "reference", "rm"):
    (tmp_path / folder / "preprocessor_config.json").write_text(processor)
  out = tmp_path / "result.json"
  result = _experiment().main([
    f"--policy={tmp_path / 'policy'}", f"--reward_model={tmp_path / 'rm'}",
    f"--reference={tmp_path / 'reference'}", f"--n={N}", "--num_scenes=2",
    f"--max_new_tokens={MAX_NEW}", "--batch_size=4", f"--out={out}",
  ])  # fmt: skip
  table = result["table"]
  assert list(table) == ["greedy", "sampled", "bon_rm", "bon_implicit", "bon_oracle"]
  for row in table.values():
    assert 0.0 <= row["hallucination_rate"] <= 1.0 and 0.0 <= row["object_recall"] <= 1.0
    assert 0.0 < row["mean_answer_tokens"] <= MAX_NEW
  assert table["bon_oracle"]["hallucination_rate"] <= table["sampled"]["hallucination_rate"]
  assert json.loads(out.read_text())["table"] == json.loads(json.dumps(table))
