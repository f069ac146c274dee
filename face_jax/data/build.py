"""Builds a face dataset once as TFDS array_record files.

  # an insightface folder (train.rec/.idx [+ meta.rec/.idx] + property)
  python -m face_jax.data.build --dataset=recordio --data_dir=/data/faces_emore \
      --name=ms1mv2 --out=/data/tfds [--group_of_class=groups.npy] \
      [--attributes=train=/data/attrs.npz]
  # every verification pack (*.bin) of a folder, one split each
  python -m face_jax.data.build --dataset=verification --data_dir=/data/faces_emore \
      --name=ms1mv2_val --out=/data/tfds
  # root/<identity>/<image>
  python -m face_jax.data.build --dataset=folder --data_dir=/data/casia --out=/data/tfds
  # the synthetic biased faces of configs/mvcom.py (options override its data keys)
  python -m face_jax.data.build --dataset=synthetic --out=/data/tfds --option=seed=0

`--split name=input` replaces or adds a split (a .rec prefix, a .bin, a folder). TFDS
shows a progress bar per split; the end prints examples, bytes and skipped records per
split and the config keys that read the result. Exit status 1 when the build fails.
"""

import argparse
import glob
import os
import sys
from typing import Optional, Sequence

from face_jax.data import tfds_builders
from train_jax import tfds_build

DATASETS = {"recordio": "face_recordio", "folder": "face_folder",
            "verification": "face_verification", "synthetic": "face_synthetic"}


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m face_jax.data.build", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", required=True, choices=sorted(DATASETS))
  p.add_argument("--out", required=True, help="TFDS data dir the build is written under")
  p.add_argument("--data_dir", default="", help="the pack folder / image root")
  p.add_argument("--name", default="", help="config name (default: the dataset)")
  p.add_argument("--split", action="append", default=[], help="name=input")
  p.add_argument("--attributes", action="append", default=[],
                 help="recordio: split=attrs.npz, per-image columns of that split's pack")
  p.add_argument("--group_of_class", default="", help="recordio: .npy group id per identity")
  p.add_argument("--option", action="append", default=[], help="synthetic: data key=value")
  p.add_argument("--overwrite", action="store_true", help="replace an existing build")
  p.add_argument("--max_bad_fraction", type=float, default=1e-4,
                 help="fail a split when more of its records do not read or decode")
  return p


def _preset_splits(dataset: str, data_dir: str) -> dict[str, list[str]]:
  if dataset == "synthetic":
    return {"train": [], "meta": [], "test": []}
  if not data_dir:
    return {}
  if dataset == "recordio":
    splits = {"train": [os.path.join(data_dir, "train")]}
    if os.path.isfile(os.path.join(data_dir, "meta.rec")):
      splits["meta"] = [os.path.join(data_dir, "meta")]
    return splits
  if dataset == "folder":
    return {"train": [data_dir]}
  packs = sorted(glob.glob(os.path.join(data_dir, "*.bin")))
  if not packs:
    raise ValueError(f"--data_dir={data_dir} holds no .bin verification packs")
  return {os.path.splitext(os.path.basename(p))[0]: [p] for p in packs}


def resolve(args: argparse.Namespace):
  builder = DATASETS[args.dataset]
  splits = _preset_splits(args.dataset, args.data_dir)
  splits.update(tfds_build.parse_splits(args.split))
  for split, paths in tfds_build.parse_splits(args.attributes).items():
    if split not in splits:
      raise ValueError(f"--attributes for split {split!r}, which is not built")
    splits[split] = splits[split][:1] + paths
  if not splits:
    raise ValueError(f"--dataset={args.dataset}: give --data_dir or --split=name=input")
  options = tfds_build.parse_options(args.option)
  if args.group_of_class:
    options["group_of_class"] = args.group_of_class
  config = tfds_builders.make_config(builder, args.name or args.dataset, splits,
                                     max_bad_fraction=args.max_bad_fraction, options=options)
  return builder, config


def read_hint(builder: str, config, out: str) -> str:
  if builder == "face_synthetic":  # the synthetic training path renders on the fly
    return f"train_jax.tfds_build.open_split({out!r}, '{builder}/{config.name}', split)"
  key = "tfds_val_name" if builder == "face_verification" else "tfds_name"
  return (f"--config.data.source=tfds --config.data.tfds_dir={out} "
          f"--config.data.{key}={builder}/{config.name}")


def main(argv: Optional[Sequence[str]] = None) -> int:
  return tfds_build.cli_main(parser(), resolve, tfds_builders.build, read_hint, argv)


if __name__ == "__main__":
  sys.exit(main())
