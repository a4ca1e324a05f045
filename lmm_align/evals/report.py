"""Evaluation and pipeline reports: one HTML page and its Markdown twin, PNG files beside them.

Design. A `Report` is an ordered list of sections (text, table, figure, examples). Each `add_*`
renders its section twice at once, to HTML and to Markdown, from the same formatted cells, so
the two pages hold the same tables and link the same images. Figures are matplotlib `Figure`
objects built without pyplot (no global figure registry, so nothing is left open) and example
images are thumbnailed; both are encoded to PNG bytes when added and written as files beside
the pages by `write`. The pages link them by relative name, so a report folder can be copied,
zipped or opened offline: the HTML carries its own CSS and no script.

Every string that comes from data (a model's answer may hold `<script>`) is escaped: HTML
entities in the page, backslash escapes in the Markdown. Only `add_text` takes Markdown, and
that is the report author's, not the model's.

Readers of a workdir: `read_metrics` parses the training loop's metrics.jsonl (the truncated
last line of a killed run is dropped; a step logged twice by a resumed run keeps its latest
record), `read_summary` an evaluation's summary.json. `pipeline_report` composes them into
the report of a multi-stage run (SFT -> DPO -> PPO rounds ...).
"""

from __future__ import annotations

import html
import io
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from lmm_align.data import jsonl

ImageLike = Image.Image | str | os.PathLike | np.ndarray
Curves = dict[str, tuple[np.ndarray, np.ndarray]]  # metric -> (steps, values)

PIPELINE_TABLE_METRICS = ("hallucination_rate", "object_recall", "pope_f1", "mean_answer_tokens")
PIPELINE_CURVE_METRICS = ("loss", "reward", "kl", "rewards/margin", "accuracy")
THUMBNAIL_SIZE = 256
_FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_BULLET = re.compile(r"\s*[-*] ")
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|&])")
_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td { white-space: pre-wrap; max-width: 32em; }
img.plot { max-width: 100%; }
img.thumb { width: 160px; image-rendering: pixelated; }
code { background: #f3f3f3; padding: 0 3px; }
"""


def format_value(value: Any) -> str:
  """A table cell: floats to 4 significant digits, None empty, containers as compact JSON."""
  if value is None:
    return ""
  if isinstance(value, bool | np.bool_):
    return str(bool(value)).lower()
  if isinstance(value, int | np.integer):
    return str(int(value))
  if isinstance(value, float | np.floating):
    return f"{float(value):.4g}"
  if isinstance(value, Mapping | list | tuple):
    return json.dumps(value, default=str)
  return str(value)


def escape_markdown(text: str) -> str:
  """Literal text in a Markdown table cell: punctuation that Markdown (or raw HTML in it) would
  interpret is backslash-escaped, and line breaks become <br> since a table row is one line."""
  one_line = text.replace("\r\n", "\n").replace("\r", "\n")
  return _MARKDOWN_SPECIAL.sub(r"\\\1", one_line).replace("\n", "<br>")


def figure_png(figure: Figure) -> bytes:
  """The figure as PNG bytes (Agg, the default canvas of a Figure made without pyplot)."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
  return buffer.getvalue()


def thumbnail_png(image: ImageLike, size: int = THUMBNAIL_SIZE, where: str = "image") -> bytes:
  """A PIL image, an image file or an HxWxC uint8 array as PNG bytes, shrunk (never enlarged)
  to fit `size` x `size`. `where` names the example in error messages."""
  if isinstance(image, str | os.PathLike):
    path = os.fspath(image)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{where}: image file {path!r} does not exist")
    try:
      with Image.open(path) as opened:
        picture = _png_mode(opened)
    except OSError as e:
      raise ValueError(f"{where}: cannot read image file {path!r}: {e}") from e
  elif isinstance(image, np.ndarray):
    try:
      picture = _png_mode(Image.fromarray(image))
    except TypeError as e:
      raise ValueError(f"{where}: array {image.shape} {image.dtype} is not an image: {e}") from e
  elif isinstance(image, Image.Image):
    picture = _png_mode(image)
  else:
    raise TypeError(
      f"{where}: expected a PIL image, a path or an array, got {type(image).__name__}"
    )
  picture.thumbnail((size, size))
  buffer = io.BytesIO()
  picture.save(buffer, format="PNG")
  return buffer.getvalue()


def _png_mode(image: Image.Image) -> Image.Image:
  # convert() also copies, so thumbnail() never shrinks the caller's image in place.
  alpha = "A" in image.getbands() or "transparency" in image.info
  return image.convert("RGBA" if alpha else "RGB")


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------


class Report:
  """Sections added in order, written by `write(dir)` as dir/NAME.html, dir/NAME.md and the
  PNG files they link."""

  def __init__(self, title: str):
    self.title = title
    self._html: list[str] = []
    self._markdown: list[str] = []
    self._files: dict[str, bytes] = {}

  def add_text(self, markdown: str) -> None:
    """Author's Markdown: copied into the .md verbatim; the HTML renders a subset (paragraphs,
    `- ` bullets, `#` headings, `code` and **bold**) and shows everything else as escaped text."""
    self._html.append(_markdown_to_html(markdown))
    self._markdown.append(markdown.strip())

  def add_table(
    self, title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None
  ) -> None:
    """One row per mapping; columns default to the keys in order of first appearance. A key a
    row lacks is an empty cell."""
    for i, row in enumerate(rows):
      if not isinstance(row, Mapping):
        raise TypeError(f"table {title!r}: row {i} is a {type(row).__name__}, not a mapping")
    columns = list(columns) if columns is not None else _keys_in_order(rows)
    if not columns:
      raise ValueError(f"table {title!r} has no columns (no rows and no `columns` given)")
    cells = [[format_value(row.get(c)) for c in columns] for row in rows]
    self._add_grid(title, columns, cells, cells)

  def add_plot(
    self,
    title: str,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    filename: str,
    *,
    xticklabels: Sequence[str] | None = None,
  ) -> None:
    """Line plot, one line per named (xs, ys) series. `xticklabels` labels x = 0, 1, ... (e.g.
    stage names) instead of numbers."""
    if not series:
      raise ValueError(f"plot {title!r} has no series")
    figure = Figure(figsize=(6.4, 4.0))
    axes = figure.add_subplot()
    for label, (xs, ys) in series.items():
      if len(xs) != len(ys):
        raise ValueError(f"plot {title!r}: series {label!r} has {len(xs)} xs but {len(ys)} ys")
      axes.plot(xs, ys, marker="o" if len(xs) <= 20 else None, label=label)
    if xticklabels is not None:
      axes.set_xticks(range(len(xticklabels)), list(xticklabels), rotation=20, ha="right")
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    axes.legend()
    self.add_figure(title, figure, filename)

  def add_figure(self, title: str, figure: Figure, filename: str) -> None:
    """Any matplotlib figure (e.g. from `curves_plot`), saved as `filename` (a .png name)."""
    self.add_png(title, figure_png(figure), filename)

  def add_png(self, title: str, png: bytes, filename: str) -> None:
    """Already-encoded PNG bytes, shown full width under a section heading."""
    self._register(filename, png)
    self._html.append(
      f"<h2>{html.escape(title)}</h2>\n<figure><img class='plot' src='{filename}' "
      f"alt='{html.escape(title, quote=True)}'></figure>"
    )
    self._markdown.append(f"## {escape_markdown(title)}\n\n![{escape_markdown(title)}]({filename})")

  def add_examples(
    self,
    title: str,
    examples: Sequence[Mapping[str, Any]],
    *,
    image_key: str = "image",
    thumbnail_size: int = THUMBNAIL_SIZE,
  ) -> None:
    """A table of examples: `example[image_key]` (a PIL image, a path, an array or None) as a
    thumbnail PNG in the first column, every other key (e.g. question, before, after) as text."""
    text_columns = [k for k in _keys_in_order(examples) if k != image_key]
    section = len(self._html)  # unique per report, so two example tables never share a file
    html_rows, markdown_rows, pngs = [], [], {}
    for i, example in enumerate(examples):
      texts = [format_value(example.get(k)) for k in text_columns]
      image_html = image_markdown = ""
      if example.get(image_key) is not None:
        where = f"examples {title!r}, example {i}, field {image_key!r}"
        filename = f"examples{section:02d}_{i:03d}.png"
        pngs[filename] = thumbnail_png(example[image_key], thumbnail_size, where)
        image_html = f"<img class='thumb' src='{filename}' alt='example {i}'>"
        image_markdown = f"![example {i}]({filename})"
      html_rows.append([image_html, *(html.escape(t) for t in texts)])
      markdown_rows.append([image_markdown, *(escape_markdown(t) for t in texts)])
    # Registered only once every image was read, so a bad one leaves the report unchanged.
    for filename, png in pngs.items():
      self._register(filename, png)
    self._add_grid(title, [image_key, *text_columns], html_rows, markdown_rows, escaped=True)

  def html(self) -> str:
    """The page: inline CSS, no script, images by relative file name."""
    body = "\n".join(self._html)
    return (
      "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
      f"<title>{html.escape(self.title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
      f"<h1>{html.escape(self.title)}</h1>\n{body}\n</body>\n</html>\n"
    )

  def markdown(self) -> str:
    return "\n\n".join([f"# {escape_markdown(self.title)}", *self._markdown]) + "\n"

  def write(self, directory: str | os.PathLike, name: str = "report") -> tuple[str, str]:
    """Writes the PNG files, NAME.html and NAME.md into `directory`; returns the two paths."""
    if not _FILENAME.fullmatch(name):
      raise ValueError(f"report name {name!r}: use letters, digits, '.', '_' and '-' only")
    os.makedirs(directory, exist_ok=True)
    for filename, png in self._files.items():
      with open(os.path.join(directory, filename), "wb") as f:
        f.write(png)
    html_path = os.path.join(directory, f"{name}.html")
    md_path = os.path.join(directory, f"{name}.md")
    with open(html_path, "w", encoding="utf-8") as f:
      f.write(self.html())
    with open(md_path, "w", encoding="utf-8") as f:
      f.write(self.markdown())
    return html_path, md_path

  def _register(self, filename: str, png: bytes) -> None:
    # The name goes into an HTML attribute and a Markdown link unescaped, hence the strict form.
    if not (_FILENAME.fullmatch(filename) and filename.endswith(".png")):
      raise ValueError(f"image file name {filename!r}: use [A-Za-z0-9._-] and end in .png")
    if filename in self._files:
      raise ValueError(f"image file name {filename!r} is used twice in report {self.title!r}")
    self._files[filename] = png

  def _add_grid(self, title, columns, html_cells, markdown_cells, escaped=False) -> None:
    """A table section; cells are plain text unless `escaped` says they are already markup."""
    if not escaped:
      html_cells = [[html.escape(c) for c in row] for row in html_cells]
      markdown_cells = [[escape_markdown(c) for c in row] for row in markdown_cells]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>\n" for row in html_cells)
    self._html.append(
      f"<h2>{html.escape(title)}</h2>\n<table>\n<thead><tr>{head}</tr></thead>\n"
      f"<tbody>\n{body}</tbody>\n</table>"
    )
    lines = [
      "| " + " | ".join(escape_markdown(c) for c in columns) + " |",
      "|" + "---|" * len(columns),
      *("| " + " | ".join(row) + " |" for row in markdown_cells),
    ]
    self._markdown.append(f"## {escape_markdown(title)}\n\n" + "\n".join(lines))


def _keys_in_order(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  return list(dict.fromkeys(k for row in rows for k in row))


def _markdown_to_html(text: str) -> str:
  blocks = []
  for block in re.split(r"\n[ \t]*\n", text.strip()):
    lines = block.splitlines()
    if all(_BULLET.match(line) for line in lines):
      items = "".join(f"<li>{_inline_html(_BULLET.sub('', x, count=1))}</li>" for x in lines)
      blocks.append(f"<ul>{items}</ul>")
    elif len(lines) == 1 and (heading := re.fullmatch(r"(#{1,4}) (.*)", block)):
      level = len(heading[1]) + 2  # h1 is the report's title, h2 its sections
      blocks.append(f"<h{level}>{_inline_html(heading[2])}</h{level}>")
    else:
      blocks.append(f"<p>{' '.join(_inline_html(line) for line in lines)}</p>")
  return "\n".join(blocks)


def _inline_html(text: str) -> str:
  """`code` spans and **bold**; the text is escaped before any tag is added."""
  parts = text.split("`")
  if len(parts) % 2 == 0:  # an unmatched backtick is literal
    parts[-2:] = [parts[-2] + "`" + parts[-1]]
  out = []
  for i, part in enumerate(parts):
    escaped = html.escape(part)
    if i % 2:
      out.append(f"<code>{escaped}</code>")
    else:
      out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped))
  return "".join(out)


# ------------------------------------------------------------------------------------------
# Workdir readers and training curves
# ------------------------------------------------------------------------------------------


def read_metrics(workdir: str | os.PathLike, *, skip_bad_lines: bool = False) -> Curves:
  """WORKDIR/metrics.jsonl -> {metric: (steps int64[S], values float64[S])}, sorted by step.

  Records need not carry every metric; non-numeric values are ignored. A truncated last line
  (a run killed mid-write) is dropped with a warning. Any other unreadable line raises a
  ValueError naming the file and line, or is skipped and counted in a warning with
  `skip_bad_lines`. A step logged again (a run resumed from an earlier checkpoint) keeps its
  latest record.
  """
  curves, skipped = _read_metrics_file(os.path.join(workdir, "metrics.jsonl"), skip_bad_lines)
  if skipped:
    warnings.warn(
      f"{os.fspath(workdir)}/metrics.jsonl: skipped {skipped} unreadable lines", stacklevel=2
    )
  return curves


def _read_metrics_file(path: str, skip_bad_lines: bool) -> tuple[Curves, int]:
  bad_lines: list[int] | None = [] if skip_bad_lines else None
  by_metric: dict[str, dict[int, float]] = {}
  for number, record in jsonl.numbered_records(path, tolerate_cut_tail=True, bad_lines=bad_lines):
    try:
      step = _step_of(record)
    except ValueError as e:
      if bad_lines is None:
        raise ValueError(f"{path}: line {number}: {e}") from None
      bad_lines.append(number)
      continue
    for name, value in record.items():
      if name != "step" and isinstance(value, int | float) and not isinstance(value, bool):
        by_metric.setdefault(name, {})[step] = float(value)
  curves = {}
  for name, values in by_metric.items():
    steps = np.array(sorted(values), np.int64)
    curves[name] = (steps, np.array([values[s] for s in steps], np.float64))
  return curves, len(bad_lines or ())


def _step_of(record: dict[str, Any]) -> int:
  step = record.get("step")
  if isinstance(step, bool) or not isinstance(step, int | float) or step != int(step):
    raise ValueError(f"field 'step' must be an integer, got {step!r}")
  return int(step)


def read_summary(workdir: str | os.PathLike) -> dict[str, Any]:
  """WORKDIR/summary.json as a dict (nested values included; see `scalar_metrics`)."""
  path = os.path.join(workdir, "summary.json")
  with open(path, encoding="utf-8") as f:
    try:
      summary = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e
  if not isinstance(summary, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(summary).__name__}")
  return summary


def scalar_metrics(summary: Mapping[str, Any]) -> dict[str, float | int]:
  """The top-level numbers of a summary; nested dicts, lists, strings and booleans are left out."""
  return {
    k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)
  }


def curves_plot(curves: Curves, names: Sequence[str], title: str = "") -> Figure | None:
  """One panel per metric in `names` that `curves` holds (value against step), up to three
  panels a row; None when it holds none of them."""
  present = [n for n in names if n in curves]
  if not present:
    return None
  columns = min(3, len(present))
  rows = -(-len(present) // columns)
  figure = Figure(figsize=(4.2 * columns, 3.0 * rows), layout="constrained")
  for i, name in enumerate(present):
    axes = figure.add_subplot(rows, columns, i + 1)
    steps, values = curves[name]
    axes.plot(steps, values, marker="o" if len(steps) <= 20 else None)
    axes.set(title=name, xlabel="step")
    axes.grid(alpha=0.3)
  if title:
    figure.suptitle(title)
  return figure


# ------------------------------------------------------------------------------------------
# The report of a multi-stage pipeline
# ------------------------------------------------------------------------------------------


def pipeline_report(
  root: str | os.PathLike,
  stages: Sequence[tuple[str, str | os.PathLike]],
  out_dir: str | os.PathLike,
  *,
  title: str = "Pipeline report",
  table_metrics: Sequence[str] = PIPELINE_TABLE_METRICS,
  across_stages: Sequence[str] = ("hallucination_rate",),
  curve_metrics: Sequence[str] = PIPELINE_CURVE_METRICS,
  image_for: Callable[[Mapping[str, Any]], ImageLike | None] | None = None,
  max_examples: int = 8,
) -> tuple[str, str]:
  """The report of stages run in order, each a workdir (relative to `root`, or absolute) with
  an optional summary.json and metrics.jsonl; returns (html_path, md_path) in `out_dir`.

  Sections: the stages' `table_metrics` (those any summary has); the other scalar summary
  metrics, one row each; `across_stages` metrics plotted over the stages (e.g. hallucination rate
  across rounds); each stage's training curves (`curve_metrics` it logged); and the summaries'
  `examples` ({"scene" | "image", "answer"}) side by side, first stage ("before") to last
  ("after"). An example's image is `image_for(example)` when given (e.g. rendering a
  shapes-world scene id), otherwise its "image" path, relative to the stage's workdir.
  """
  names = [name for name, _ in stages]
  if len(set(names)) != len(names) or not all(names) or {"image", "example"} & set(names):
    # A stage name is also a column of the examples table, beside "image" and "example".
    raise ValueError(f"stage names must be non-empty, distinct, not image/example: {names}")
  workdirs = [os.path.join(root, workdir) for _, workdir in stages]
  summaries, curves, notes = {}, {}, []
  for name, workdir in zip(names, workdirs):
    if os.path.isfile(os.path.join(workdir, "summary.json")):
      summaries[name] = read_summary(workdir)
    else:
      notes.append(f"- `{name}`: no summary.json in `{workdir}`")
    if os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
      curves[name], skipped = _read_metrics_file(os.path.join(workdir, "metrics.jsonl"), True)
      if skipped:
        notes.append(f"- `{name}`: skipped {skipped} unreadable lines of metrics.jsonl")

  report = Report(title)
  report.add_text("\n".join(f"- `{n}`: `{w}`" for n, w in zip(names, workdirs)))
  if notes:
    report.add_text("**Missing or damaged**\n\n" + "\n".join(notes))
  _add_summary_tables(report, names, summaries, table_metrics)
  series = {}
  for metric in across_stages:
    points = [(i, summaries[n][metric]) for i, n in enumerate(names) if _has(summaries, n, metric)]
    if points:
      series[metric] = ([i for i, _ in points], [v for _, v in points])
  if series:
    ylabel = next(iter(series)) if len(series) == 1 else "value"
    report.add_plot(
      "Across stages", series, "stage", ylabel, "across_stages.png", xticklabels=names
    )
  for i, name in enumerate(names):
    figure = curves_plot(curves.get(name, {}), curve_metrics)
    if figure is not None:
      report.add_figure(f"Training curves: {name}", figure, f"curves_{i:02d}.png")
  examples = _examples_side_by_side(names, workdirs, summaries, image_for, max_examples)
  if examples:
    report.add_examples("Example answers, first stage to last", examples)
  return report.write(out_dir)


def _has(summaries: Mapping[str, Mapping[str, Any]], stage: str, metric: str) -> bool:
  return metric in scalar_metrics(summaries.get(stage, {}))


def _add_summary_tables(report: Report, names, summaries, table_metrics) -> None:
  chosen = [m for m in table_metrics if any(_has(summaries, n, m) for n in names)]
  if chosen:
    rows = [{"stage": n, **{m: summaries.get(n, {}).get(m) for m in chosen}} for n in names]
    report.add_table("Evaluation", rows, ["stage", *chosen])
  scalars = {n: scalar_metrics(summaries.get(n, {})) for n in names}
  others = [m for m in _keys_in_order(list(scalars.values())) if m not in chosen]
  if others:  # one row per metric: there may be dozens (per-split POPE, CHAIR_i, ...)
    rows = [{"metric": m, **{n: scalars[n].get(m) for n in names}} for m in others]
    report.add_table("Other summary metrics", rows, ["metric", *names])


def _examples_side_by_side(names, workdirs, summaries, image_for, max_examples):
  """One row per scene id or image path (in order of first appearance, at most
  `max_examples`), one answer column per stage."""
  rows: dict[str, dict[str, Any]] = {}
  for name, workdir in zip(names, workdirs):
    examples = summaries.get(name, {}).get("examples", [])
    path = os.path.join(workdir, "summary.json")
    if not isinstance(examples, list):
      raise ValueError(f"{path}: field 'examples' must be a list")
    for i, example in enumerate(examples):
      key_field = _example_key_field(example, f"{path}: examples[{i}]")
      key = str(example[key_field])
      if key not in rows:
        if len(rows) == max_examples:
          continue
        rows[key] = {"image": _example_image(example, workdir, image_for), "example": key}
      rows[key][name] = example["answer"]
  return list(rows.values())


def _example_key_field(example: Any, where: str) -> str:
  if not isinstance(example, dict):
    raise ValueError(f"{where}: expected an object, got {type(example).__name__}")
  if "answer" not in example:
    raise ValueError(f"{where}: missing field 'answer'")
  for field in ("scene", "image"):
    if field in example:
      return field
  raise ValueError(f"{where}: needs a field 'scene' or 'image'")


def _example_image(example, workdir, image_for) -> ImageLike | None:
  if image_for is not None:
    return image_for(example)
  if "image" in example:
    return os.path.join(workdir, example["image"])
  return None
