"""Face `.rec` input throughput: images/s read, decoded and augmented, per core.

  python benchmarks/bench_face_input.py [--num_images 2000] [--batch_size 128]
      [--threads 1,2] [--seconds 5]

Writes its own fixture (112x112 JPEGs, quality 95, smooth face-like structure plus
sensor noise) into a temporary directory, then times, on this machine:
  read     pread + record reassembly + IRHeader (RecordIO.read)
  decode   JPEG -> uint8 RGB with Pillow (and simplejpeg if installed)
  element  read + decode + random flip + (x/255 - 0.5)/0.5, one thread, no grain
  grain    the training pipeline (`train_dataset`), batches of --batch_size, with
           1..N read threads
  tfds     the same pack built once into a TFDS array_record dataset
           (face_jax.data.build's face_recordio builder; build time printed): read
           through TfdsFaceSource, and the grain pipeline over it
(element and grain rows once per available decoder: simplejpeg, Pillow).
"per core" divides by the CPU seconds the process used (all threads), so it stays
meaningful on a shared machine; wall-clock images/s are printed beside it.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

# Run as a script from the repository root: make `face_jax` importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from face_jax.data import pipeline  # pylint: disable=wrong-import-position
from face_jax.data import recordio  # pylint: disable=wrong-import-position
from face_jax.data import tfds_builders  # pylint: disable=wrong-import-position


def fixture_images(n: int, size: int, seed: int):
  """Yields {"image", "label"}: low-frequency colour fields (JPEG sizes like real crops)
  plus noise; 10 images per identity."""
  rng = np.random.default_rng(seed)
  for i in range(n):
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)
    noisy = np.clip(smooth + rng.normal(0, 4, smooth.shape), 0, 255).astype(np.uint8)
    yield {"image": noisy, "label": i // 10}


def timed(fn, seconds: float):
  """Repeats fn() (returns items done) for about `seconds`: (items, wall s, cpu s)."""
  items, w0, c0 = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - w0 < seconds:
    items += fn()
  return items, time.perf_counter() - w0, time.process_time() - c0


def row(name: str, items: int, wall: float, cpu: float):
  print(f"{name:<38} {items / wall:>10.0f} {items / max(cpu, 1e-9):>14.0f} {cpu / wall:>6.2f}")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--num_images", type=int, default=2000)
  p.add_argument("--image_size", type=int, default=112)
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--threads", default="1,2")
  p.add_argument("--seconds", type=float, default=5.0)
  p.add_argument("--jpeg_quality", type=int, default=95)
  args = p.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    prefix = os.path.join(tmp, "train")
    t0 = time.perf_counter()
    n = recordio.write_recordio(prefix, fixture_images(args.num_images, args.image_size, 0),
                                jpeg_quality=args.jpeg_quality)
    rec = recordio.RecordIO(prefix)
    size = os.path.getsize(prefix + ".rec")
    print(f"fixture: {n} images {args.image_size}x{args.image_size}, {size / n / 1024:.1f} KiB "
          f"per record, written in {time.perf_counter() - t0:.1f} s; cpu cores: {os.cpu_count()}; "
          f"simplejpeg: {'yes' if recordio.simplejpeg else 'no'}")
    print(f"{'stage':<38} {'images/s':>10} {'per CPU-second':>14} {'cores':>6}")

    order = np.random.default_rng(0).permutation(n)
    encoded = [rec.read(i)[1] for i in range(n)]

    def read_all():
      for i in order:
        rec.read(i)
      return n
    row("read (pread + unpack)", *timed(read_all, args.seconds))

    def decode_with(module):
      def run():
        saved, recordio.simplejpeg = recordio.simplejpeg, module
        try:
          for data in encoded:
            recordio.decode_image(data, "bench")
        finally:
          recordio.simplejpeg = saved
        return n
      return run
    row("decode, Pillow", *timed(decode_with(None), args.seconds))
    if recordio.simplejpeg is not None:
      row("decode, simplejpeg", *timed(decode_with(recordio.simplejpeg), args.seconds))

    decoders = [("simplejpeg", recordio.simplejpeg)] if recordio.simplejpeg else []
    decoders.append(("Pillow", None))
    installed = recordio.simplejpeg
    flip_rng = np.random.default_rng(1)

    def element_all():
      for i in order:
        image = rec[i]["image"]
        if flip_rng.random() < 0.5:
          image = pipeline.hflip(image)
        pipeline.normalize(image)
      return n

    for decoder, module in decoders:
      recordio.simplejpeg = module
      row(f"element ({decoder}): read..norm", *timed(element_all, args.seconds))
      for threads in (int(t) for t in args.threads.split(",")):
        ds = pipeline.train_dataset(rec, batch_size=args.batch_size, seed=0,
                                    image_size=(args.image_size, args.image_size),
                                    read_threads=threads, prefetch_batches=2 * threads)
        it = iter(ds)
        next(it)  # start the threads
        batch_of = lambda it=it: len(next(it)["label"])
        row(f"grain ({decoder}), {threads} thread(s)", *timed(batch_of, args.seconds))
        it.close()
    recordio.simplejpeg = installed

    t0 = time.perf_counter()
    out = os.path.join(tmp, "tfds")
    tfds_builders.build("face_recordio", tfds_builders.make_config(
        "face_recordio", "bench", {"train": [prefix]}), out)
    built = tfds_builders.TfdsFaceSource(out, "face_recordio/bench")
    print(f"tfds build of the pack: {time.perf_counter() - t0:.1f} s")

    def read_tfds():
      for i in order:
        built.read(i)
      return n
    row("tfds read (array_record)", *timed(read_tfds, args.seconds))
    for threads in (int(t) for t in args.threads.split(",")):
      it = iter(pipeline.train_dataset(built, batch_size=args.batch_size, seed=0,
                                       image_size=(args.image_size, args.image_size),
                                       read_threads=threads, prefetch_batches=2 * threads))
      next(it)
      batch_of = lambda it=it: len(next(it)["label"])
      row(f"tfds grain ({decoders[0][0]}), {threads} thread(s)", *timed(batch_of, args.seconds))
      it.close()
    rec.close()


if __name__ == "__main__":
  main()
