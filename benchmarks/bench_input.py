"""Input pipelines alone: examples/s wall and per CPU-second, against the step they feed.

  python benchmarks/bench_input.py [--pipelines simla_default,simla_small,simla_base,
      simla_base_tfds,face_synthetic,face_rec,face_rec_tfds] [--seconds 10] [--threads 0]
      [--results benchmarks/results.jsonl]

Pipelines (each the one the training run uses, on data made here, nothing downloaded):
  simla_default   simla_jax.data.pipeline.make_train_iterator, shapes world, configs/simla.py
                  (64 px, batch 32, text 24)
  simla_small     the same at bench_simla's `small` shapes (64 px, batch 8, text 30)
  simla_base      configs/simla.py:paper's data pipeline (256 px view with its augmentation,
                  128 px dVAE view, BEiT block masks, WordPiece) on caption JSON + JPEG files
                  made here (480x640, quality 90; a generated vocab.txt); batch 64, text 30
  simla_base_tfds simla_base with the same files built into a TFDS array_record dataset
                  (simla_jax.data.build's builder) and read with data.source="tfds"
  face_synthetic  face_jax.synthetic_task's synthetic biased faces with the meta batch (configs/mvcom.py)
  face_rec        face_jax.data.pipeline.train_dataset over an insightface .rec written here
                  (112 px JPEGs, benchmarks/bench_face_input.py's fixture), batch 128
  face_rec_tfds   face_rec with that .rec built into a TFDS face_recordio dataset
                  (face_jax.data.build's builder), read through TfdsFaceSource
The build time of the TFDS rows is not timed (a build is done once).

"per CPU-second" divides by the CPU time of this process, all threads (worker processes
are off: --threads sets grain read threads), so it is the rate per core on a shared
machine. With --results, each pipeline is compared with the latest step measurement
of the same batch in that file (bench_simla.py / bench_mvcom.py --out): on a CPU the
ratio of examples per CPU-second of the input to those of the step (they share the
cores; the target is >= 3), with an accelerator the ratio of wall examples/s.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import common  # noqa: E402

PIPELINES = ("simla_default", "simla_small", "simla_base", "simla_base_tfds", "face_synthetic",
             "face_rec", "face_rec_tfds")
# Which step measurements (bench, sizes, row) each pipeline feeds.
FEEDS = {"simla_default": ("simla", ("default",), None), "simla_small": ("simla", ("small",), None),
         "simla_base": ("simla", ("base",), None),
         "simla_base_tfds": ("simla", ("base",), None),
         "face_synthetic": ("mvcom", ("default",), "mvcom"),
         "face_rec": ("mvcom", ("r18", "r50", "r100"), "mvcom"),
         "face_rec_tfds": ("mvcom", ("r18", "r50", "r100"), "mvcom")}


def timed(next_batch, seconds: float) -> tuple[int, float, float]:
  """Pulls batches for about `seconds` after one warm-up batch: (examples, wall, CPU s)."""
  next_batch()
  n, w0, c0 = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - w0 < seconds:
    n += next_batch()
  return n, time.perf_counter() - w0, time.process_time() - c0


def _simla_config(name: str, threads: int, tmp: str):
  from configs import simla as simla_config
  c = simla_config.get_config("paper" if name.startswith("simla_base") else None)
  if name == "simla_small":
    c.batch_size, c.data.max_len = 8, 30
  elif name.startswith("simla_base"):   # the paper's data config on files made here
    c.batch_size, c.data.max_len = 64, 30
    c.data.captions.update(train_files=(_caption_fixture(tmp),), image_root=tmp)
    c.data.tokenizer.vocab_file = _vocab_fixture(tmp)
    if name == "simla_base_tfds":
      from simla_jax.data import tfds_builders
      out = os.path.join(tmp, "tfds")
      tfds_builders.build("simla_captions", tfds_builders.make_config(
          "simla_captions", "bench", {"train": list(c.data.captions.train_files)},
          image_root=tmp), out)
      c.data.update(source="tfds", tfds_dir=out, tfds_name="simla_captions/bench")
  c.data.loader.update(num_threads=threads, prefetch_buffer_size=2 * threads, worker_count=0)
  return c


_WORDS = ("a man woman dog cat red blue green small large on in the of with sitting standing "
          "next to table street grass car bus plate food holding two three people").split()


def _caption_fixture(tmp: str, n: int = 64) -> str:
  """n JPEGs shaped like COCO photos and a caption JSON naming them."""
  rng = np.random.default_rng(0)
  records = []
  for i in range(n):
    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((640, 480), Image.BICUBIC), np.float32)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    path = os.path.join(tmp, f"img{i}.jpg")
    Image.fromarray(img).save(path, quality=90)
    caps = [" ".join(rng.choice(_WORDS, rng.integers(8, 16))) for _ in range(5)]
    records.append({"image": os.path.basename(path), "caption": caps})
  path = os.path.join(tmp, "captions.json")
  with open(path, "w") as f:
    json.dump(records, f)
  return path


def _vocab_fixture(tmp: str) -> str:
  path = os.path.join(tmp, "vocab.txt")
  with open(path, "w") as f:
    f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _WORDS) + "\n")
  return path


def simla(name: str, threads: int, tmp: str):
  from simla_jax.data import pipeline
  c = _simla_config(name, threads, tmp)
  it = pipeline.make_train_iterator(c.data, batch_size=c.batch_size)
  return c.batch_size, lambda: len(next(it)["text_ids"]), it


def face_synthetic(threads: int):
  from configs import mvcom as mvcom_config
  from face_jax import synthetic_task
  from face_jax.data import synthetic
  c = mvcom_config.get_config(None)
  faces = synthetic.SyntheticFaces(c.data, c.seed)
  it = synthetic_task.batch_iterator(
      synthetic_task.SyntheticBatches(c, faces, with_meta=True), prefetch=threads)
  # Examples of the training batch (the meta batch comes with it).
  return c.batch_size, lambda: len(next(it)["label"]), it


def face_rec(threads: int, tmp: str, batch: int = 128, n: int = 2048, tfds: bool = False):
  from benchmarks import bench_face_input
  from face_jax.data import pipeline, recordio
  prefix = os.path.join(tmp, "train")
  if not os.path.exists(prefix + ".rec"):
    recordio.write_recordio(prefix, bench_face_input.fixture_images(n, 112, 0), jpeg_quality=95)
  rec = recordio.RecordIO(prefix)
  if tfds:
    from face_jax.data import tfds_builders
    out = os.path.join(tmp, "tfds")
    tfds_builders.build("face_recordio", tfds_builders.make_config(
        "face_recordio", "bench", {"train": [prefix]}), out)
    rec = tfds_builders.TfdsFaceSource(out, "face_recordio/bench")
  ds = pipeline.train_dataset(rec, batch_size=batch, seed=0, read_threads=max(threads, 1),
                              prefetch_batches=2 * max(threads, 1))
  it = iter(ds)
  return batch, lambda: len(next(it)["label"]), it


def latest_step(path: str, name: str, batch: int):
  """The latest step result feeding `name` at this batch, or None: (rate, on_cpu, record).

  On a CPU the input and the step share the cores, so the rate is examples per
  CPU-second; with an accelerator the step's rate is wall examples/s.
  """
  if not path or not os.path.exists(path):
    return None
  bench, sizes, row = FEEDS[name]
  found = None
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      if (r.get("bench") == bench and r.get("size") in sizes and r.get("batch") == batch
          and (row is None or r.get("row") == row) and r.get("step_s")
          and not r.get("memory_only") and "ablation" not in r.get("label", "")):
        found = r
  if found is None:
    return None
  on_cpu = found.get("backend") == "cpu"
  return (batch / found["cpu_s"] if on_cpu else batch / found["step_s"]), on_cpu, found


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--pipelines", default=",".join(PIPELINES))
  p.add_argument("--seconds", type=float, default=10.0)
  p.add_argument("--threads", type=int, default=0, help="grain read threads (0: in the caller)")
  p.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "results.jsonl"),
                 help="step measurements to compare with ('' to skip)")
  p.add_argument("--out", default="")
  p.add_argument("--label", default="")
  args = p.parse_args(argv)

  load_before = common.load()
  header = ["pipeline", "batch", "examples/s", "per CPU-s", "cores", "step examples/s",
            "input/step"]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name in (s.strip() for s in args.pipelines.split(",")):
      if name not in PIPELINES:
        raise SystemExit(f"unknown pipeline {name!r}; choose from {', '.join(PIPELINES)}")
      if name.startswith("simla"):
        batch, next_batch, it = simla(name, args.threads, tmp)
      elif name == "face_synthetic":
        batch, next_batch, it = face_synthetic(args.threads)
      else:
        batch, next_batch, it = face_rec(args.threads, tmp, tfds=name == "face_rec_tfds")
      n, wall, cpu = timed(next_batch, args.seconds)
      if hasattr(it, "close"):
        it.close()
      step = latest_step(args.results, name, batch)
      per_cpu = n / max(cpu, 1e-9)
      ratio = None
      if step:
        ratio = (per_cpu if step[1] else n / wall) / step[0]
      rows.append([name, batch, f"{n / wall:.1f}", f"{per_cpu:.1f}", f"{cpu / wall:.2f}",
                   f"{step[0]:.2f} ({'per CPU-s' if step[1] else 'wall'})" if step else "-",
                   f"{ratio:.1f}" if step else "-"])
      common.append_result(args.out, dict(
          bench="input", pipeline=name, batch=batch, examples_per_s=n / wall,
          examples_per_cpu_s=per_cpu, threads=args.threads, label=args.label,
          step_rate=step[0] if step else None, step_on_cpu=step[1] if step else None,
          input_over_step=ratio, step_date=step[2]["date"] if step else None))
  common.print_table(header, rows)
  print(f"load before / after: {load_before} / {common.load()}; cores: {os.cpu_count()}")


if __name__ == "__main__":
  main()
