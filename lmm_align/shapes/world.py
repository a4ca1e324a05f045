"""The shapes world: synthetic scenes with exact ground truth, for hallucination alignment.

A scene is 1-4 coloured shapes on a 3x3 grid over a plain (lightly noisy) background. Every
fact about it is known, so a tiny LLaVA can be trained on CPU in minutes and its hallucinations
counted exactly (`shapes_metrics`), with no GPT judge in the loop; `shapes_benchmarks` builds
POPE and MMHal-style evaluation sets on the same scenes and `tfds_world` serves the SFT
mixture as a TFDS dataset. The vocabulary is small and
closed (6 shapes, 6 colours, 2 sizes, 9 positions, 3 backgrounds) so a byte-level BPE of ~1k
tokens covers it.

The world has COCO-like statistics on purpose, so that the hallucinations POPE probes for have a
cause: shapes and colours follow a Zipf prior (circle and red are "popular") and each shape has
a partner it co-occurs with (circle-square, triangle-star, diamond-cross), like fork and knife.
Injected hallucinations prefer partners too, mimicking the co-occurrence errors of the
machine-written instruction data that motivated LLaVA-RLHF.

Everything is a pure function of a seed: record `i` of `make_sft_records(n, config, seed)` comes
from `np.random.default_rng([*seed, i])`, so any record can be regenerated alone (the TFDS
builder and sharded readers rely on this) and `make_scenes` yields the same scenes.

Records are in LLaVA's instruction format:
  {"id", "image": PIL.Image, "conversations": [{"from": "human", "value": "<image>\\n..."},
   {"from": "gpt", "value": ...}], "metadata": {"task", "scene", "facts", "answer",
   "injected", "injection", ...task-specific fields}}
`metadata["answer"]` is always the ground truth, whatever the gpt turn says; `facts` is a
truthful caption (Fact-RLHF's image facts). For an injected caption, `facts` and the gpt turn
use the same template and differ only by the hallucination: a ready-made preference pair.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
COLOURS = {
  "red": (220, 40, 40),
  "green": (40, 170, 60),
  "blue": (40, 80, 220),
  "yellow": (235, 200, 20),
  "purple": (140, 60, 190),
  "orange": (245, 130, 20),
}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (150, 150, 150), "black": (25, 25, 25)}
SIZES = ("small", "large")
POSITIONS = (
  ("top left", "top", "top right"),
  ("left", "center", "right"),
  ("bottom left", "bottom", "bottom right"),
)
ALL_POSITIONS = tuple(p for row in POSITIONS for p in row)
NUMBER_WORDS = tuple("zero one two three four five six seven eight nine ten".split())
TASKS = ("caption", "count", "exist", "colour", "spatial", "multiple_choice")
DEFAULT_TASK_MIX = (
  ("caption", 0.3),
  ("count", 0.12),
  ("exist", 0.18),
  ("colour", 0.12),
  ("spatial", 0.12),
  ("multiple_choice", 0.16),
)
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."  # LLaVA's VQA suffix
MULTIPLE_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
OPTION_LETTERS = "ABCD"

# Radius in grid cells; the rest of the cell is room for jitter, so objects never overlap.
_RADIUS = {"small": 0.28, "large": 0.44}
RELATION_PHRASES = {
  "left": "to the left of",
  "right": "to the right of",
  "above": "above",
  "below": "below",
}
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_DESCRIBE_QUESTIONS = (
  "Describe the image.",
  "What is in the image?",
  "Describe the shapes in this picture.",
  "What do you see in the image?",
  "Give a short description of the image.",
)


@dataclasses.dataclass(frozen=True)
class ShapesWorldConfig:
  """How scenes and SFT records are drawn.

  image_size: side of the rendered square RGB image, in pixels.
  min_objects, max_objects: objects per scene, drawn uniformly in this range (at most 9 cells).
  shapes, colours, backgrounds: the vocabulary scenes draw from (subsets of the module's).
  background_noise: std of Gaussian pixel noise on the background (0 for a flat colour).
  cooccurrence: chance that a later object takes the partner shape of an earlier one.
  popularity_skew: Zipf exponent of the shape and colour priors (0 for uniform).
  hallucination_rate: chance that a caption answer carries an injected hallucination.
  short_answer_noise_rate: chance that a short answer (yes/no, count, colour, position, letter)
    is wrong; flagged in the metadata like injected captions.
  task_mix: (task, weight) pairs over TASKS; weights need not sum to one.
  seed: default seed of the generators.
  """

  image_size: int = 64
  min_objects: int = 1
  max_objects: int = 4
  shapes: tuple[str, ...] = SHAPES
  colours: tuple[str, ...] = tuple(COLOURS)
  backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
  background_noise: float = 4.0
  cooccurrence: float = 0.5
  popularity_skew: float = 1.0
  hallucination_rate: float = 0.2
  short_answer_noise_rate: float = 0.0
  task_mix: tuple[tuple[str, float], ...] = DEFAULT_TASK_MIX
  seed: int = 0

  def __post_init__(self):
    unknown = (
      set(self.shapes) - set(SHAPES)
      | set(self.colours) - set(COLOURS)
      | set(self.backgrounds) - set(BACKGROUNDS)
      | {t for t, _ in self.task_mix} - set(TASKS)
    )
    if unknown:
      raise ValueError(f"unknown shapes/colours/backgrounds/tasks: {sorted(unknown)}")
    # One (colour, shape) pair must stay absent, for "no" questions and injected objects.
    most = min(9, len(self.shapes) * len(self.colours) - 1)
    if not 1 <= self.min_objects <= self.max_objects <= most:
      raise ValueError(f"need 1 <= min_objects <= max_objects <= {most}, got {self}")
    if len(self.colours) < 2 or not self.backgrounds:
      raise ValueError("need at least two colours (wrong-colour answers) and one background")
    for name in ("cooccurrence", "hallucination_rate", "short_answer_noise_rate"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
    if (
      not self.task_mix
      or min(w for _, w in self.task_mix) < 0
      or sum(w for _, w in self.task_mix) <= 0
    ):
      raise ValueError(f"task_mix needs non-negative weights with a positive sum: {self.task_mix}")
    if self.image_size < 8:
      raise ValueError(f"image_size {self.image_size} is too small to draw shapes")


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One shape. `offset` is its (dx, dy) jitter from the cell centre, in grid cells."""

  shape: str
  colour: str
  size: str
  row: int
  col: int
  offset: tuple[float, float] = (0.0, 0.0)

  @property
  def name(self) -> str:
    """'red circle': the object's identity (no scene holds two of them)."""
    return f"{self.colour} {self.shape}"

  @property
  def position(self) -> str:
    return POSITIONS[self.row][self.col]


@dataclasses.dataclass(frozen=True)
class Scene:
  """The ground truth of one image. `noise` and `noise_seed` make rendering deterministic."""

  objects: tuple[SceneObject, ...]
  background: str = "white"
  noise: float = 0.0
  noise_seed: int = 0
  id: str = ""

  @property
  def pairs(self) -> set[tuple[str, str]]:
    """The (colour, shape) pairs present."""
    return {(o.colour, o.shape) for o in self.objects}

  def count(self, shape: str | None = None, colour: str | None = None) -> int:
    """How many objects have this shape and/or colour (None matches any)."""
    return sum(
      (shape is None or o.shape == shape) and (colour is None or o.colour == colour)
      for o in self.objects
    )

  def to_dict(self) -> dict[str, Any]:
    """JSON-native (lists, not tuples), so it equals itself after a JSON round trip."""
    d = dataclasses.asdict(self)
    d["objects"] = [{**o, "offset": list(o["offset"])} for o in d["objects"]]
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Scene:
    objects = tuple(SceneObject(**{**o, "offset": tuple(o["offset"])}) for o in d["objects"])
    return cls(**{**d, "objects": objects})


def _seed_sequence(seed: int | Sequence[int], index: int) -> list[int]:
  return [*(seed if isinstance(seed, Sequence) else [seed]), index]


def _seed_tag(seed: int | Sequence[int]) -> str:
  return "-".join(str(s) for s in (seed if isinstance(seed, Sequence) else [seed]))


def _zipf(n: int, skew: float) -> np.ndarray:
  weights = 1.0 / np.arange(1, n + 1) ** skew
  return weights / weights.sum()


def partner_shape(shape: str, shapes: Sequence[str] = SHAPES) -> str:
  """The shape `shape` co-occurs with: consecutive pairs of `shapes`; an odd last one is alone."""
  i = list(shapes).index(shape)
  return shapes[i ^ 1] if (i ^ 1) < len(shapes) else shape


# ------------------------------------------------------------------------------------------
# Scenes and rendering.
# ------------------------------------------------------------------------------------------


def generate_scene(
  rng: np.random.Generator, config: ShapesWorldConfig, scene_id: str = ""
) -> Scene:
  """Draws a scene: distinct cells, distinct (colour, shape) pairs, Zipf + partner priors."""
  n = int(rng.integers(config.min_objects, config.max_objects + 1))
  cells = rng.permutation(9)[:n]
  shape_p = _zipf(len(config.shapes), config.popularity_skew)
  colour_p = _zipf(len(config.colours), config.popularity_skew)
  objects: list[SceneObject] = []
  for cell in cells:
    used = {(o.colour, o.shape) for o in objects}
    for _ in range(20):
      if objects and rng.random() < config.cooccurrence:
        shape = partner_shape(objects[rng.integers(len(objects))].shape, config.shapes)
      else:
        shape = config.shapes[rng.choice(len(config.shapes), p=shape_p)]
      colour = config.colours[rng.choice(len(config.colours), p=colour_p)]
      if (colour, shape) not in used:
        break
    else:  # the priors keep hitting used pairs (tiny vocabularies): fall back to uniform
      free = [(c, s) for s in config.shapes for c in config.colours if (c, s) not in used]
      colour, shape = free[rng.integers(len(free))]
    size = SIZES[rng.integers(len(SIZES))]
    jitter = max(0.0, 0.47 - _RADIUS[size])
    dx, dy = (round(float(v), 3) for v in rng.uniform(-jitter, jitter, size=2))
    objects.append(SceneObject(shape, colour, size, int(cell) // 3, int(cell) % 3, (dx, dy)))
  background = config.backgrounds[rng.integers(len(config.backgrounds))]
  noise_seed = int(rng.integers(2**31))
  return Scene(tuple(objects), background, config.background_noise, noise_seed, scene_id)


def make_scenes(
  n: int, config: ShapesWorldConfig, seed: int | Sequence[int] | None = None
) -> list[Scene]:
  """The scenes of `make_sft_records(n, config, seed)`, without the text or images."""
  seed = config.seed if seed is None else seed
  return [
    generate_scene(np.random.default_rng(_seed_sequence(seed, i)), config, _scene_id(seed, i))
    for i in range(n)
  ]


def _scene_id(seed: int | Sequence[int], index: int) -> str:
  return f"shapes-{_seed_tag(seed)}-{index:06d}"


def _centre(obj: SceneObject, size: int) -> tuple[float, float]:
  cell = size / 3
  return (obj.col + 0.5 + obj.offset[0]) * cell, (obj.row + 0.5 + obj.offset[1]) * cell


def object_center(obj: SceneObject, size: int) -> tuple[int, int]:
  """The (x, y) pixel at the object's centre in a `size` x `size` render."""
  x, y = _centre(obj, size)
  return int(x), int(y)


def _draw_shape(
  draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill
) -> None:
  if shape == "circle":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
  elif shape == "square":
    h = 0.85 * r  # a square of half-side r looks much bigger than the circle of radius r
    draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
  elif shape == "triangle":
    draw.polygon(
      [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)], fill=fill
    )
  elif shape == "diamond":
    draw.polygon([(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)], fill=fill)
  elif shape == "star":
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    draw.polygon(list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles))), fill=fill)
  elif shape == "cross":
    w = max(0.34 * r, 0.75)  # arms at least ~2 px thick even at 32 px
    draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
  else:
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = 64) -> Image.Image:
  """Draws the scene as a `size` x `size` RGB image.

  Shapes are drawn aliased, straight at the target size: edges stay crisp and every interior
  pixel has exactly the object's colour (tests and any pixel-level check can rely on it).
  """
  pixels = np.broadcast_to(np.asarray(BACKGROUNDS[scene.background], np.float64), (size, size, 3))
  if scene.noise > 0:
    noise_rng = np.random.default_rng([scene.noise_seed, size])
    pixels = pixels + noise_rng.normal(0.0, scene.noise, (size, size, 3))
  image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "RGB")
  draw = ImageDraw.Draw(image)
  for obj in scene.objects:
    cx, cy = _centre(obj, size)
    _draw_shape(draw, obj.shape, cx, cy, _RADIUS[obj.size] * size / 3, COLOURS[obj.colour])
  return image


# ------------------------------------------------------------------------------------------
# Text: object phrases and captions.
# ------------------------------------------------------------------------------------------


def with_article(phrase: str) -> str:
  """'red circle' -> 'a red circle', 'orange star' -> 'an orange star'."""
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _cap(text: str) -> str:
  return text[0].upper() + text[1:]


def position_phrase(position: str) -> str:
  """'top left' -> 'in the top left', 'top' -> 'at the top', 'left' -> 'on the left'."""
  if position in ("top", "bottom"):
    return f"at the {position}"
  if position in ("left", "right"):
    return f"on the {position}"
  return f"in the {position}"


def object_phrase(obj: SceneObject, *, size: bool = True, position: bool = False) -> str:
  """'a large red circle', with ' in the top left' when `position`."""
  phrase = with_article(f"{obj.size} {obj.name}" if size else obj.name)
  return f"{phrase} {position_phrase(obj.position)}" if position else phrase


def colour_free_reference(obj: SceneObject, scene: Scene) -> str:
  """How a colour question can name an object without giving its colour away."""
  if scene.count(shape=obj.shape) == 1:
    return f"the {obj.shape}"
  return f"the {obj.shape} {position_phrase(obj.position)}"


def _join(phrases: Sequence[str]) -> str:
  return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def count_phrase(n: int, noun: str, plural: str) -> str:
  """'no circles', 'one circle', 'two circles'."""
  return f"{NUMBER_WORDS[n] if n else 'no'} {noun if n == 1 else plural}"


CAPTION_TEMPLATES = 4


def scene_caption(scene: Scene, rng: np.random.Generator, template: int | None = None) -> str:
  """A caption naming every object's colour and shape; `template` (or rng) picks the wording.

  Templates 0-2 also give sizes and positions; 3 gives sizes only. Object order is shuffled.
  """
  kind = int(rng.integers(CAPTION_TEMPLATES)) if template is None else template
  objects = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
  if kind == 0:
    count = _cap(count_phrase(len(objects), "shape", "shapes"))
    phrases = [object_phrase(o, position=True) for o in objects]
    return f"{count} on a {scene.background} background: {_join(phrases)}."
  if kind == 1:
    return f"The image shows {_join([object_phrase(o, position=True) for o in objects])}."
  if kind == 2:
    return " ".join(f"There is {object_phrase(o, position=True)}." for o in objects)
  return f"A {scene.background} image with {_join([object_phrase(o) for o in objects])}."


def omission_caption(scene: Scene, facts_seed: int, rng: np.random.Generator) -> str | None:
  """The scene's caption (same wording as `scene_caption` with `facts_seed`) with one object
  left out: a truthful but incomplete answer; None for a scene with one object."""
  if len(scene.objects) < 2:
    return None
  drop = int(rng.integers(len(scene.objects)))
  kept = dataclasses.replace(
    scene, objects=tuple(o for i, o in enumerate(scene.objects) if i != drop)
  )
  return scene_caption(kept, np.random.default_rng(facts_seed))


def binding_error_caption(scene: Scene, facts_seed: int, rng: np.random.Generator) -> str | None:
  """The scene's caption (same wording as `scene_caption` with `facts_seed`) with one binding
  error: an object takes the colour, or the shape, of another present object, so that every
  colour and shape it names is in the image but one (colour, shape) pairing is not. This is
  the error a model that sees colours and shapes but not which goes with which makes (the
  SFT policy's most common hallucination). None when no swap makes an absent pair."""
  swaps = []
  for i, a in enumerate(scene.objects):
    for b in scene.objects:
      swaps += [
        (i, wrong)
        for wrong in (
          dataclasses.replace(a, colour=b.colour),
          dataclasses.replace(a, shape=b.shape),
        )
        if (wrong.colour, wrong.shape) not in scene.pairs
      ]
  if not swaps:
    return None
  i, wrong = swaps[int(rng.integers(len(swaps)))]
  objects = tuple(wrong if k == i else o for k, o in enumerate(scene.objects))
  believed = dataclasses.replace(scene, objects=objects)
  return scene_caption(believed, np.random.default_rng(facts_seed))


def caption_pair(
  record: dict[str, Any],
  rng: np.random.Generator,
  *,
  omission_fraction: float,
  binding_fraction: float = 0.0,
) -> tuple[str, str]:
  """(chosen, rejected) from a caption record made with hallucination_rate 1.

  By default the truthful caption (its facts) against the injected one. With chance
  `omission_fraction` (scenes of 2+ objects) the rejected caption leaves one object out, so
  that saying less is not a way to win; with chance `binding_fraction` it carries a binding
  error (`binding_error_caption`). Both answers of a pair then share one wording.
  """
  scene = Scene.from_dict(record["metadata"]["scene"])
  draw, flawed = rng.random(), None
  if draw < omission_fraction and len(scene.objects) > 1:
    wording = int(rng.integers(2**31))
    flawed = omission_caption(scene, wording, rng)
  elif draw < omission_fraction + binding_fraction:
    wording = int(rng.integers(2**31))
    flawed = binding_error_caption(scene, wording, rng)
  if flawed is None:
    return record["metadata"]["facts"], record["conversations"][1]["value"]
  return scene_caption(scene, np.random.default_rng(wording)), flawed


def _inject_hallucination(
  scene: Scene, rng: np.random.Generator, config: ShapesWorldConfig
) -> tuple[Scene, dict[str, Any]]:
  """What a noisy annotator believed: one extra object, or a wrong colour on a present one.

  Returns that believed scene (whose caption is the hallucinated answer) and a description.
  Either way the hallucinated (colour, shape) pair is absent from the true scene.
  """
  present = scene.pairs
  recolourable = [
    i
    for i, o in enumerate(scene.objects)
    if any((c, o.shape) not in present for c in config.colours)
  ]
  objects = list(scene.objects)
  if recolourable and rng.random() < 0.5:
    i = recolourable[rng.integers(len(recolourable))]
    wrong = [c for c in config.colours if (c, objects[i].shape) not in present]
    colour = wrong[rng.integers(len(wrong))]
    injection = {
      "kind": "wrong_colour",
      "object": [colour, objects[i].shape],
      "true_colour": objects[i].colour,
    }
    objects[i] = dataclasses.replace(objects[i], colour=colour)
  else:
    absent = [(c, s) for s in config.shapes for c in config.colours if (c, s) not in present]
    partners = {partner_shape(o.shape, config.shapes) for o in scene.objects}
    likely = [p for p in absent if p[1] in partners]
    pool = likely if likely and rng.random() < 0.5 else absent  # co-occurrence-driven, like LLMs
    colour, shape = pool[rng.integers(len(pool))]
    used = {(o.row, o.col) for o in objects}
    free = [c for c in range(9) if divmod(c, 3) not in used] or list(range(9))
    row, col = divmod(int(free[rng.integers(len(free))]), 3)
    size = SIZES[rng.integers(len(SIZES))]
    objects.insert(int(rng.integers(len(objects) + 1)), SceneObject(shape, colour, size, row, col))
    injection = {"kind": "extra_object", "object": [colour, shape]}
  return dataclasses.replace(scene, objects=tuple(objects)), injection


# ------------------------------------------------------------------------------------------
# SFT tasks: (scene, rng, config, facts_seed, corrupt) -> (question, answer, metadata), with
# metadata["answer"] the truth; `corrupt` asks for a wrong short answer.
# ------------------------------------------------------------------------------------------


def _other(options: Sequence[Any], truth: Any, rng: np.random.Generator) -> Any:
  others = [o for o in options if o != truth]
  return others[rng.integers(len(others))]


def _task_caption(scene, rng, config, facts_seed, corrupt):
  del corrupt  # captions are corrupted at hallucination_rate, not the short-answer rate
  question = _DESCRIBE_QUESTIONS[rng.integers(len(_DESCRIBE_QUESTIONS))]
  truth = scene_caption(scene, np.random.default_rng(facts_seed))
  if rng.random() >= config.hallucination_rate:
    return question, truth, {"answer": truth}
  believed, injection = _inject_hallucination(scene, rng, config)
  answer = scene_caption(believed, np.random.default_rng(facts_seed))
  return question, answer, {"answer": truth, "injected": True, "injection": injection}


def _task_count(scene, rng, config, facts_seed, corrupt):
  kind = rng.integers(3)
  shape = colour = None
  noun, plural = "object", "objects"
  if kind == 1:
    present = [o.shape for o in scene.objects]
    pool = present if rng.random() < 0.75 else config.shapes  # now and then an absent shape
    shape = pool[rng.integers(len(pool))]
    noun, plural = shape, PLURALS[shape]
  elif kind == 2:
    colour = scene.objects[rng.integers(len(scene.objects))].colour
    noun, plural = f"{colour} object", f"{colour} objects"
  question = f"How many {plural} are there in the image?"
  truth = scene.count(shape=shape, colour=colour)
  given = truth + (1 if truth == 0 or rng.random() < 0.5 else -1) if corrupt else truth
  answer = f"There {'is' if given == 1 else 'are'} {count_phrase(given, noun, plural)}."
  return question, answer, {"answer": truth, "query": {"shape": shape, "colour": colour}}


def existence_question(name: str) -> str:
  """'Is there a red circle in the image?' (the exist task, POPE and the RL prompts)."""
  return f"Is there {with_article(name)} in the image?"


def existence_answers(name: str) -> tuple[str, str]:
  """(yes, no) full-sentence answers to `existence_question(name)`."""
  return (
    f"Yes, there is {with_article(name)} in the image.",
    f"No, there is no {name} in the image.",
  )


def existence_exchange(name: str, said_yes: bool, rng: np.random.Generator) -> tuple[str, str]:
  """(question, answer): half the time LLaVA's short-answer form ("...\n<prompt>" -> "Yes"),
  else a full sentence; one draw from `rng`."""
  question = existence_question(name)
  if rng.random() < 0.5:
    return f"{question}\n{SHORT_ANSWER_PROMPT}", "Yes" if said_yes else "No"
  yes, no = existence_answers(name)
  return question, yes if said_yes else no


def _task_exist(scene, rng, config, facts_seed, corrupt):
  if rng.random() < 0.5:
    colour, shape = scene.objects[rng.integers(len(scene.objects))].name.split()
  else:
    absent = [(c, s) for s in config.shapes for c in config.colours if (c, s) not in scene.pairs]
    colour, shape = absent[rng.integers(len(absent))]
  truth = "yes" if (colour, shape) in scene.pairs else "no"
  said_yes = (truth == "yes") != corrupt
  question, answer = existence_exchange(f"{colour} {shape}", said_yes, rng)
  return question, answer, {"answer": truth, "object": [colour, shape]}


def _task_colour(scene, rng, config, facts_seed, corrupt):
  i = int(rng.integers(len(scene.objects)))
  obj = scene.objects[i]
  ref = colour_free_reference(obj, scene)
  given = _other(config.colours, obj.colour, rng) if corrupt else obj.colour
  return (
    f"What color is {ref}?",
    f"{_cap(ref)} is {given}.",
    {"answer": obj.colour, "object_index": i},
  )


def _task_spatial(scene, rng, config, facts_seed, corrupt):
  if len(scene.objects) < 2 or rng.random() < 0.3:
    i = int(rng.integers(len(scene.objects)))
    obj = scene.objects[i]
    given = _other(ALL_POSITIONS, obj.position, rng) if corrupt else obj.position
    answer = f"The {obj.name} is {position_phrase(given)} of the image."
    return (
      f"Where is the {obj.name} in the image?",
      answer,
      {"answer": obj.position, "object_index": i},
    )
  i, j = (int(k) for k in rng.permutation(len(scene.objects))[:2])
  a, b = scene.objects[i], scene.objects[j]
  true_relations = relations(a, b)
  relation = true_relations[rng.integers(len(true_relations))]
  asked = relation if rng.random() < 0.5 else _OPPOSITE[relation]
  truth = "yes" if asked == relation else "no"
  said = _OPPOSITE[relation] if corrupt else relation
  answer = (
    f"{'Yes' if said == asked else 'No'}, the {a.name} is {RELATION_PHRASES[said]} the {b.name}."
  )
  question = f"Is the {a.name} {RELATION_PHRASES[asked]} the {b.name}?"
  return question, answer, {"answer": truth, "subject": i, "reference": j, "relation": asked}


def _task_multiple_choice(scene, rng, config, facts_seed, corrupt):
  i = int(rng.integers(len(scene.objects)))
  obj = scene.objects[i]
  kind = ("colour", "shape", "count", "position")[rng.integers(4)]
  reference, where, n = (
    colour_free_reference(obj, scene),
    position_phrase(obj.position),
    len(scene.objects),
  )
  question, truth, pool = {
    "colour": (f"What color is {reference}?", obj.colour, config.colours),
    "shape": (f"Which shape is {where} of the image?", obj.shape, config.shapes),
    "count": ("How many objects are there in the image?", str(n), [str(k) for k in range(1, 10)]),
    "position": (f"Where is the {obj.name}?", obj.position, ALL_POSITIONS),
  }[kind]
  others = [p for p in pool if p != truth]
  options = [others[k] for k in rng.permutation(len(others))[: len(OPTION_LETTERS) - 1]] + [truth]
  options = [options[k] for k in rng.permutation(len(options))]
  letter = OPTION_LETTERS[options.index(truth)]
  given = _other(OPTION_LETTERS[: len(options)], letter, rng) if corrupt else letter
  lines = (
    [question]
    + [f"{OPTION_LETTERS[k]}. {o}" for k, o in enumerate(options)]
    + [MULTIPLE_CHOICE_PROMPT]
  )
  meta = {
    "answer": letter,
    "options": options,
    "correct_option": truth,
    "subtype": kind,
    "object_index": i,
  }
  return "\n".join(lines), given, meta


_TaskBuilder = Callable[
  [Scene, np.random.Generator, ShapesWorldConfig, int, bool], tuple[str, str, dict[str, Any]]
]
_TASK_BUILDERS: dict[str, _TaskBuilder] = {
  "caption": _task_caption,
  "count": _task_count,
  "exist": _task_exist,
  "colour": _task_colour,
  "spatial": _task_spatial,
  "multiple_choice": _task_multiple_choice,
}


def relations(a: SceneObject, b: SceneObject) -> list[str]:
  """Which of 'left', 'right', 'above', 'below' hold for `a` relative to `b` (by grid cell)."""
  out = []
  if a.col != b.col:
    out.append("left" if a.col < b.col else "right")
  if a.row != b.row:
    out.append("above" if a.row < b.row else "below")
  return out


def make_sft_record(
  index: int, config: ShapesWorldConfig, seed: int | Sequence[int] | None = None
) -> dict[str, Any]:
  """Record `index` of the SFT mixture: a scene, its image, one task's question and answer."""
  seed = config.seed if seed is None else seed
  rng = np.random.default_rng(_seed_sequence(seed, index))
  scene = generate_scene(rng, config, _scene_id(seed, index))
  facts_seed = int(rng.integers(2**31))
  tasks, weights = zip(*config.task_mix)
  task = tasks[rng.choice(len(tasks), p=np.asarray(weights) / sum(weights))]
  corrupt = task != "caption" and rng.random() < config.short_answer_noise_rate
  question, answer, meta = _TASK_BUILDERS[task](scene, rng, config, facts_seed, corrupt)
  injected = meta.pop("injected", corrupt)
  injection = meta.pop("injection", {"kind": "wrong_answer"} if corrupt else None)
  metadata = {
    "task": task,
    "scene": scene.to_dict(),
    "facts": scene_caption(scene, np.random.default_rng(facts_seed)),
    **meta,
    "injected": injected,
    "injection": injection,
  }
  return {
    "id": scene.id,
    "image": render(scene, config.image_size),
    "conversations": [
      {"from": "human", "value": f"<image>\n{question}"},
      {"from": "gpt", "value": answer},
    ],
    "metadata": metadata,
  }


def make_sft_records(
  n: int, config: ShapesWorldConfig, seed: int | Sequence[int] | None = None
) -> list[dict[str, Any]]:
  """Records 0..n-1 of the SFT mixture (see `make_sft_record`)."""
  return [make_sft_record(i, config, seed) for i in range(n)]
