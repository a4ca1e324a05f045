"""Reports: the HTML page parses, links only PNG files that exist and open, escapes model text;
the Markdown twin holds the same tables and image links; metrics.jsonl / summary.json readers
tolerate killed and resumed runs and name the line of bad input; pipeline_report on two fake
stage workdirs."""

from __future__ import annotations

import html.parser
import json
import pathlib

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st
from matplotlib import pyplot
from PIL import Image

from lmm_align.evals import report as report_lib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert('x')</script> & a|b *c* [d](e) \\ _f_"


class PageParser(html.parser.HTMLParser):
  """Start tags, <img> sources and table cells (text; an image cell reads 'img:SRC')."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.tags, self.img_srcs, self.tables, self.texts = [], [], [], []
    self._cell = None

  def handle_starttag(self, tag, attrs):
    self.tags.append(tag)
    attrs = dict(attrs)
    if tag == "table":
      self.tables.append([])
    elif tag == "tr":
      self.tables[-1].append([])
    elif tag in ("td", "th"):
      self._cell = []
    elif tag == "img":
      self.img_srcs.append(attrs["src"])
      if self._cell is not None:
        self._cell.append(f"img:{attrs['src']}")

  def handle_endtag(self, tag):
    if tag in ("td", "th"):
      self.tables[-1][-1].append("".join(self._cell))
      self._cell = None

  def handle_data(self, data):
    self.texts.append(data)
    if self._cell is not None:
      self._cell.append(data)


def split_markdown_row(line: str) -> list[str]:
  """A pipe-table row's cells, unescaped: backslash takes the next character literally, an
  unescaped | separates cells, <br> is a line break, ![alt](SRC) reads 'img:SRC'."""
  cells, current, i = [], [], 0
  while i < len(line):
    if line[i] == "\\":
      current.append(line[i + 1])
      i += 2
    elif line[i] == "|":
      cells.append("".join(current))
      current, i = [], i + 1
    elif line.startswith("<br>", i):
      current.append("\n")
      i += 4
    elif line.startswith("![", i):
      close = line.index(")", i)
      current.append("img:" + line[line.index("](", i) + 2 : close])
      i = close + 1
    else:
      current.append(line[i])
      i += 1
  assert cells[0] == "" and "".join(current) == "", line
  return [c.removeprefix(" ").removesuffix(" ") for c in cells[1:]]


def markdown_tables(text: str) -> list[list[list[str]]]:
  tables, lines = [], text.split("\n")
  for i, line in enumerate(lines):
    if line.startswith("|") and not lines[i - 1].startswith("|"):
      block = [line]
      for following in lines[i + 1 :]:
        if not following.startswith("|"):
          break
        block.append(following)
      assert set(block[1]) == {"|", "-"}, block[1]  # the header separator
      tables.append([split_markdown_row(row) for row in [block[0], *block[2:]]])
  return tables


def assert_valid_png(path: pathlib.Path) -> tuple[int, int]:
  assert path.read_bytes()[:8] == PNG_SIGNATURE, path
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    assert image.format == "PNG"
    return image.size


# ------------------------------------------------------------------------------------------
# One report with every kind of section, built once
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("report")
  photo = Image.new("RGB", (400, 300), (200, 30, 30))
  path_image = root / "source.png"
  Image.new("RGBA", (64, 64), (0, 0, 255, 128)).save(path_image)
  array_image = np.zeros((32, 48, 3), np.uint8)
  report = report_lib.Report("Eval <b>run</b>")
  report.add_text("# Setup\n\nSome **bold** and `code <x>`.\n\n- one\n- two <i>")
  report.add_table(
    "Metrics",
    [
      {"model": "sft", "rate": 0.123456, "n": 7, "big": 12345.678, "ok": True},
      {"model": EVIL, "rate": float("nan"), "extra": None, "nested": {"a": 1}},
    ],
  )
  steps = np.arange(5)
  report.add_plot("Loss", {"train": (steps, steps**2)}, "step", "loss", "loss.png")
  report.add_plot(
    "Rate", {"a": ([0, 1], [0.5, 0.4]), "b": ([1], [0.3])}, "stage", "rate", "rate.png",
    xticklabels=["sft", "dpo"],
  )  # fmt: skip
  examples = [
    {"image": photo, "question": "What is it?", "before": EVIL, "after": "a red\nsquare"},
    {"image": str(path_image), "question": "Colour?", "before": "blue", "after": "blue"},
    {"image": array_image, "question": "Dark?", "before": "yes"},
    {"image": None, "question": "No image", "after": "-"},
  ]
  report.add_examples("Examples", examples)
  html_path, md_path = report.write(root / "out")
  page = PageParser()
  page.feed(pathlib.Path(html_path).read_text(encoding="utf-8"))
  return {
    "root": root, "html_path": pathlib.Path(html_path), "md_path": pathlib.Path(md_path),
    "page": page, "photo": photo, "markdown": pathlib.Path(md_path).read_text(encoding="utf-8"),
  }  # fmt: skip


def test_every_image_is_a_png_beside_the_page(built):
  out, page = built["html_path"].parent, built["page"]
  assert built["html_path"].name == "report.html" and built["md_path"].name == "report.md"
  assert page.img_srcs == ["loss.png", "rate.png", *(f"examples04_{i:03d}.png" for i in range(3))]
  sizes = {src: assert_valid_png(out / src) for src in page.img_srcs}
  assert sizes["examples04_000.png"] == (256, 192)  # 400x300 thumbnailed, aspect kept
  assert sizes["examples04_001.png"] == (64, 64)  # small images are not enlarged
  assert sizes["examples04_002.png"] == (48, 32)
  assert all(w > 100 and h > 100 for w, h in (sizes["loss.png"], sizes["rate.png"]))
  assert built["photo"].size == (400, 300)  # the caller's image is not shrunk in place
  assert sorted(p.name for p in out.iterdir()) == sorted(
    [*page.img_srcs, "report.html", "report.md"]
  )


def test_model_text_is_escaped_and_the_page_is_offline(built):
  raw, page = built["html_path"].read_text(encoding="utf-8"), built["page"]
  assert "script" not in page.tags and "<script>" not in raw
  assert not {"b", "i", "x"} & set(page.tags)  # title/text markup arrives as text
  assert "Eval <b>run</b>" in page.texts
  assert EVIL in [c for table in page.tables for row in table for c in row]
  assert "http" not in raw and "src='/" not in raw
  assert {"h1", "h2", "h3", "p", "ul", "li", "strong", "code", "style"} <= set(page.tags)


def test_table_cells_are_formatted(built):
  header, *rows = built["page"].tables[0]
  assert header == ["model", "rate", "n", "big", "ok", "extra", "nested"]
  assert rows == [
    ["sft", "0.1235", "7", "1.235e+04", "true", "", ""],
    [EVIL, "nan", "", "", "", "", '{"a": 1}'],
  ]


def test_markdown_twin_has_the_same_tables_and_images(built):
  markdown, page = built["markdown"], built["page"]
  assert markdown_tables(markdown) == page.tables
  assert page.tables[1] == [
    ["image", "question", "before", "after"],
    ["img:examples04_000.png", "What is it?", EVIL, "a red\nsquare"],
    ["img:examples04_001.png", "Colour?", "blue", "blue"],
    ["img:examples04_002.png", "Dark?", "yes", ""],
    ["", "No image", "", "-"],
  ]
  links = [line.split("](")[1].rstrip(")") for line in markdown.split("\n") if "![" in line]
  assert [link for link in links if "|" not in link] == ["loss.png", "rate.png"]
  assert "<script>" not in markdown and markdown.startswith("# Eval \\<b\\>run\\</b\\>\n")
  assert "# Setup\n\nSome **bold** and `code <x>`." in markdown  # author's Markdown verbatim


def test_figures_are_not_left_open(built):
  del built
  assert pyplot.get_fignums() == []


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.text(alphabet=st.characters(exclude_characters="\r"), max_size=40))
def test_markdown_cell_escaping_round_trips(text):
  escaped = report_lib.escape_markdown(text)
  assert "\n" not in escaped
  assert split_markdown_row(f"| {escaped} |") == [text]


@pytest.mark.parametrize(
  "value, expected",
  [(0.000123456, "0.0001235"), (2.0, "2"), (np.float32(0.5), "0.5"), (np.int64(3), "3"),
   (1e20, "1e+20"), (False, "false"), (None, ""), ([1, "a"], '[1, "a"]'), ("x<y", "x<y")],
)  # fmt: skip
def test_format_value(value, expected):
  assert report_lib.format_value(value) == expected


def test_bad_input_is_refused(tmp_path):
  report = report_lib.Report("r")
  report.add_plot("p", {"s": ([0], [1])}, "x", "y", "p.png")
  with pytest.raises(ValueError, match="'p.png' is used twice"):
    report.add_plot("q", {"s": ([0], [1])}, "x", "y", "p.png")
  with pytest.raises(ValueError, match="image file name '../p.png'"):
    report.add_plot("q", {"s": ([0], [1])}, "x", "y", "../p.png")
  with pytest.raises(ValueError, match="series 's' has 2 xs but 1 ys"):
    report.add_plot("q", {"s": ([0, 1], [1])}, "x", "y", "q.png")
  missing = str(tmp_path / "gone.png")
  with pytest.raises(FileNotFoundError, match="example 1, field 'image'.*gone.png"):
    report.add_examples("ex", [{"image": Image.new("RGB", (4, 4))}, {"image": missing}])
  (tmp_path / "junk.png").write_text("not an image")
  with pytest.raises(ValueError, match="example 0, field 'image': cannot read"):
    report.add_examples("ex", [{"image": str(tmp_path / "junk.png")}])
  with pytest.raises(TypeError, match="row 0 is a list"):
    report.add_table("t", [["a"]])
  report.add_examples("ex", [{"image": Image.new("RGB", (4, 4))}])  # the failed ones left no file
  assert len(report.html().split("<img")) == 3


# ------------------------------------------------------------------------------------------
# Workdir readers
# ------------------------------------------------------------------------------------------


def write_lines(path: pathlib.Path, records: list, tail: str = "") -> None:
  path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_read_metrics_killed_and_resumed_runs(tmp_path):
  records = [
    {"step": 1, "loss": 3.0, "lr": 0.1},
    {"step": 2, "loss": 2.5, "accuracy": 0.5, "note": "text", "flag": True},
    {"step": 3, "loss": 2.0},
    {"step": 2, "loss": 2.4},  # resumed from step 1: the rerun of step 2 wins
  ]
  write_lines(tmp_path / "metrics.jsonl", records, tail='{"step": 4, "lo')
  with pytest.warns(UserWarning, match=r"metrics.jsonl: line 5: dropped a truncated last line"):
    curves = report_lib.read_metrics(tmp_path)
  assert sorted(curves) == ["accuracy", "loss", "lr"]  # strings and booleans are not metrics
  np.testing.assert_array_equal(curves["loss"][0], [1, 2, 3])
  np.testing.assert_array_equal(curves["loss"][1], [3.0, 2.4, 2.0])
  np.testing.assert_array_equal(curves["accuracy"][0], [2])
  assert curves["loss"][0].dtype == np.int64 and curves["loss"][1].dtype == np.float64


def test_read_metrics_names_the_bad_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo{"step": 2, "loss": 0.5}\n[1]\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl: line 2: not valid JSON \(Expecting"):
    report_lib.read_metrics(tmp_path)
  with pytest.warns(UserWarning, match="skipped 2 unreadable lines"):
    curves = report_lib.read_metrics(tmp_path, skip_bad_lines=True)
  np.testing.assert_array_equal(curves["loss"][1], [1.0])
  write_lines(path, [{"loss": 1.0}])
  with pytest.raises(ValueError, match=r"metrics.jsonl: line 1: field 'step' must be an integer"):
    report_lib.read_metrics(tmp_path)
  with pytest.raises(FileNotFoundError):
    report_lib.read_metrics(tmp_path / "nowhere")


def test_read_summary(tmp_path):
  (tmp_path / "summary.json").write_text('{"a": 1,\n "b": }')
  with pytest.raises(ValueError, match=r"summary.json:2: invalid JSON"):
    report_lib.read_summary(tmp_path)
  summary = {"a": 1, "b": 0.5, "c": {"d": 1}, "e": [1], "f": "x", "g": False}
  (tmp_path / "summary.json").write_text(json.dumps(summary))
  assert report_lib.read_summary(tmp_path) == summary
  assert report_lib.scalar_metrics(summary) == {"a": 1, "b": 0.5}


def test_curves_plot_panels():
  curves = {"loss": (np.arange(3), np.ones(3)), "kl": (np.arange(3), np.zeros(3))}
  figure = report_lib.curves_plot(curves, ["reward", "kl", "loss"], title="t")
  assert [axes.get_title() for axes in figure.axes] == ["kl", "loss"]
  assert report_lib.curves_plot(curves, ["reward"]) is None


# ------------------------------------------------------------------------------------------
# Pipeline report
# ------------------------------------------------------------------------------------------


def make_stage(workdir: pathlib.Path, metrics: list, summary: dict) -> None:
  workdir.mkdir(parents=True)
  write_lines(workdir / "metrics.jsonl", metrics, tail='{"step"')
  (workdir / "summary.json").write_text(json.dumps(summary))


def test_pipeline_report(tmp_path):
  make_stage(
    tmp_path / "sft",
    [{"step": s, "loss": 2.0 / s} for s in (1, 2, 3)],
    {"hallucination_rate": 0.4, "object_recall": 0.61234, "pope_f1": 0.7, "final_step": 3,
     "chair_i": 0.25,
     "pope": {"random": 0.7}, "examples": [{"scene": "s-0", "answer": "a cat <script>"},
                                           {"scene": "s-1", "answer": "a dog"}]},
  )  # fmt: skip
  make_stage(
    tmp_path / "rounds" / "dpo1",
    [{"step": s, "loss": 0.7, "rewards/margin": 0.1 * s, "accuracy": 0.5} for s in (1, 2)],
    {"hallucination_rate": 0.2, "mean_answer_tokens": 12.5,
     "examples": [{"scene": "s-1", "answer": "a dog."}, {"scene": "s-0", "answer": "a cat"}]},
  )  # fmt: skip
  colours = {"s-0": (255, 0, 0), "s-1": (0, 0, 255)}
  seen = []

  def image_for(example):
    seen.append(example)
    return Image.new("RGB", (32, 32), colours[example["scene"]])

  stages = [("sft", "sft"), ("dpo-1", "rounds/dpo1"), ("ppo", "missing")]
  with pytest.warns(UserWarning, match="truncated last line"):
    html_path, md_path = report_lib.pipeline_report(
      tmp_path, stages, tmp_path / "report", image_for=image_for
    )
  page = PageParser()
  page.feed(pathlib.Path(html_path).read_text(encoding="utf-8"))
  evaluation, others, examples = page.tables
  assert evaluation == [
    ["stage", "hallucination_rate", "object_recall", "pope_f1", "mean_answer_tokens"],
    ["sft", "0.4", "0.6123", "0.7", ""],
    ["dpo-1", "0.2", "", "", "12.5"],
    ["ppo", "", "", "", ""],
  ]
  assert others == [["metric", "sft", "dpo-1", "ppo"], ["final_step", "3", "", ""],
                    ["chair_i", "0.25", "", ""]]  # fmt: skip
  assert examples[0] == ["image", "example", "sft", "dpo-1"]
  assert [row[1:] for row in examples[1:]] == [["s-0", "a cat <script>", "a cat"],
                                               ["s-1", "a dog", "a dog."]]  # fmt: skip
  assert [e["scene"] for e in seen] == ["s-0", "s-1"]
  out = pathlib.Path(html_path).parent
  assert page.img_srcs == ["across_stages.png", "curves_00.png", "curves_01.png",
                           "examples07_000.png", "examples07_001.png"]  # fmt: skip
  for src in page.img_srcs:
    assert_valid_png(out / src)
  with Image.open(out / "examples07_001.png") as image:
    assert image.getpixel((0, 0)) == (0, 0, 255)
  markdown = pathlib.Path(md_path).read_text(encoding="utf-8")
  assert markdown_tables(markdown) == page.tables
  assert "`ppo`: no summary.json" in markdown
  assert pyplot.get_fignums() == []


def test_pipeline_report_image_paths_and_bad_examples(tmp_path):
  Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "pic.png")
  summary = {"examples": [{"image": "pic.png", "answer": "green"}]}
  (tmp_path / "summary.json").write_text(json.dumps(summary))
  html_path, _ = report_lib.pipeline_report(tmp_path, [("only", ".")], tmp_path / "out")
  page = PageParser()
  page.feed(pathlib.Path(html_path).read_text(encoding="utf-8"))
  assert page.tables[-1][1] == ["img:examples01_000.png", "pic.png", "green"]
  (tmp_path / "summary.json").write_text(json.dumps({"examples": [{"scene": "s"}]}))
  with pytest.raises(ValueError, match=r"summary.json: examples\[0\]: missing field 'answer'"):
    report_lib.pipeline_report(tmp_path, [("only", ".")], tmp_path / "out")
  with pytest.raises(ValueError, match="distinct"):
    report_lib.pipeline_report(tmp_path, [("a", "."), ("a", ".")], tmp_path / "out")
  with pytest.raises(ValueError, match="not image/example"):
    report_lib.pipeline_report(tmp_path, [("image", ".")], tmp_path / "out")
