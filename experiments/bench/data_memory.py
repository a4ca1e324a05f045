"""Host memory while DPO iterates a large RLAIF-V-style parquet: images stay on disk.

  python experiments/bench/data_memory.py                 # 2.2 GB of image bytes, one epoch
  python experiments/bench/data_memory.py --gb=0.2 --steps=50   # a quick look

A child process writes a synthetic `RLAIF-V-Dataset_000.parquet` (the published columns:
ds_name, image {bytes, path}, question, chosen, rejected, origin_dataset, origin_split, idx,
image_path) with at least --gb of image bytes to a temporary folder: JPEG (4 in 5) and PNG
images of random pixels, 140 kB on average (COCO-sized), every one unique (a
random tail after the image's end marker, which decoders ignore), in row groups of 100 rows
as `datasets` writes image tables, the image column neither dictionary-encoded nor
compressed (so the file really holds the bytes). This process then does what the DPO trainer
does: `registry.read("pairs", ...)` with source rlaifv_parquet, `preference.encode_pair` on
every record, `PreferenceData` at CLIP's 336 px, and `iterate` (the prefetching batcher) for
--steps global batches of --batch pairs (default: one epoch), each batch decoding its images
from the parquet as it needs them.

RSS (VmRSS) is sampled every 20 ms from the moment the modules are imported, before anything
is read; the last line is the peak above that start, in MB (issue #21 asks for <= 1024).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import pathlib
import tempfile
import threading
import time

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from lmm_align.data import conversation, preference, registry
from lmm_align.data.images import CLIP_VIT_L14_336, ImageProcessorConfig
from lmm_align.data.tokenizer import train_bpe_tokenizer

ROWS_PER_GROUP = 100
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  raise RuntimeError("no VmRSS in /proc/self/status")


class PeakRss:
  """The largest VmRSS seen by a thread that samples it every `interval` seconds."""

  def __init__(self, interval: float = 0.02):
    self.peak, self.interval = rss_mb(), interval
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self) -> None:
    while not self._stop.wait(self.interval):
      self.peak = max(self.peak, rss_mb())

  def stop(self) -> float:
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, rss_mb())
    return self.peak


def base_images(rng: np.random.Generator) -> list[bytes]:
  """A few encoded images of random pixels (JPEG and PNG), about 140 kB on average."""
  out = []
  for i in range(20):
    if i % 5 == 4:  # PNG: noise does not compress, so 250 x 250 x 3 is about 190 kB
      side = int(rng.integers(230, 330))
      pixels = rng.integers(0, 256, (side, side, 3), np.uint8)
      fmt, kwargs = "PNG", {}
    else:
      h, w = int(rng.integers(360, 480)), int(rng.integers(480, 640))
      pixels = rng.integers(0, 256, (h, w, 3), np.uint8)
      fmt, kwargs = "JPEG", {"quality": 60}
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **kwargs)
    out.append(buffer.getvalue())
  return out


def write_parquet(path: str, min_bytes: int, seed: int = 0) -> tuple[int, int]:
  """Writes the synthetic shard; returns (rows, image bytes)."""
  rng = np.random.default_rng(seed)
  images = base_images(rng)
  schema = pa.schema([
    ("ds_name", pa.string()), ("image", IMAGE_TYPE), ("question", pa.string()),
    ("chosen", pa.string()), ("rejected", pa.string()), ("origin_dataset", pa.string()),
    ("origin_split", pa.string()), ("idx", pa.string()), ("image_path", pa.string()),
  ])  # fmt: skip
  written, rows = 0, 0
  with pq.ParquetWriter(
    path, schema, use_dictionary=["ds_name", "origin_dataset", "origin_split"],
    compression={c: "snappy" if c != "image" else "none" for c in schema.names},
  ) as writer:  # fmt: skip
    while written < min_bytes:
      group = []
      for _ in range(ROWS_PER_GROUP):
        data = images[rng.integers(len(images))] + rng.bytes(int(rng.integers(16, 4096)))
        written += len(data)
        n = rows + len(group)
        group.append({
          "ds_name": "RLAIF-V", "image": {"bytes": data, "path": None},
          "question": f"What is in picture {n}? Describe the objects and their colours.",
          "chosen": f"The picture {n} shows a red cup on a wooden table next to a window.",
          "rejected": f"The picture {n} shows a red cup and a dog on a table near a window.",
          "origin_dataset": "MSCOCO", "origin_split": json.dumps({"type": "detailed description"}),
          "idx": str(n), "image_path": f"images/{n}.jpg",
        })  # fmt: skip
      writer.write_table(pa.Table.from_pylist(group, schema))
      rows += len(group)
  return rows, written


def _write_in_child(path: str, min_bytes: int, out: multiprocessing.Queue) -> None:
  out.put(write_parquet(path, min_bytes))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--gb", type=float, default=2.2, help="image bytes to write, in GB")
  parser.add_argument("--batch", type=int, default=8, help="global batch, in pairs")
  parser.add_argument("--steps", type=int, default=0, help="batches (0: one epoch)")
  parser.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
  args = parser.parse_args()

  start = rss_mb()
  peak = PeakRss()
  with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
    path = str(pathlib.Path(tmp) / "RLAIF-V-Dataset_000.parquet")
    t0 = time.perf_counter()
    # The writer runs in a child, so this process's RSS is only the reading side.
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_write_in_child, args=(path, int(args.gb * 1e9), results))
    child.start()
    rows, image_bytes = results.get()
    child.join()
    size = os.path.getsize(path)
    print(
      f"wrote {rows} rows, {image_bytes / 1e9:.2f} GB of image bytes, file {size / 1e9:.2f} GB, "
      f"{pq.ParquetFile(path).num_row_groups} row groups in {time.perf_counter() - t0:.0f} s"
    )

    t0 = time.perf_counter()
    data_config = ml_collections.ConfigDict(
      {"source": "rlaifv_parquet", "path": path, "on_error": "raise", "check_images": ""}
    )
    records, skipped = registry.read("pairs", data_config)
    print(
      f"read {len(records)} records ({dict(skipped)}) in {time.perf_counter() - t0:.1f} s; "
      f"RSS {rss_mb() - start:+.0f} MB"
    )
    template = conversation.get_template("vicuna_v1")
    tokenizer = train_bpe_tokenizer([template.system, records[0]["chosen"]] * 4, vocab_size=400)
    pairs = [preference.encode_pair(r, tokenizer, "vicuna_v1", 576, 4) for r in records]
    del records
    image_config = ImageProcessorConfig(
      size=336, crop_size=336, mean=CLIP_VIT_L14_336.mean, std=CLIP_VIT_L14_336.std,
      aspect_mode="pad",
    )  # fmt: skip
    data = preference.PreferenceData(
      pairs, image_config, max_length=2048, buckets=(768, 1024, 2048), pad_id=0, seed=0
    )
    del pairs
    print(f"encoded {len(data)} pairs; RSS {rss_mb() - start:+.0f} MB")

    steps = args.steps or len(data) // args.batch
    t0 = time.perf_counter()
    checksum = 0.0
    batches = data.iterate(0, args.batch)
    for step in range(steps):
      batch = next(batches)
      checksum += float(batch["pixel_values"][:, 0, 0, ::64, ::64].sum())
      if step % max(1, steps // 10) == 0:
        print(f"step {step}/{steps}: RSS {rss_mb() - start:+.0f} MB, peak {peak.peak - start:+.0f}")
    batches.close()
    seconds = time.perf_counter() - t0
    print(
      f"iterated {steps} batches of {args.batch} pairs ({steps * args.batch} images decoded) in "
      f"{seconds:.0f} s; pixel checksum {checksum:.1f}"
    )
  growth = peak.stop() - start
  print(f"host RSS growth above the process start: {growth:.0f} MB (peak; limit 1024 MB)")


if __name__ == "__main__":
  main()
