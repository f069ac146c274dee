"""Builds a SIMLA dataset once as TFDS array_record files.

  python -m simla_jax.data.build --dataset=coco_karpathy --data_dir=/data/albef_json \
      --image_root=/data/coco --out=/data/tfds
  python -m simla_jax.data.build --dataset=shapes --out=/data/tfds \
      --option=shapes.train_size=20000
  python -m simla_jax.data.build --dataset=captions --name=my_pairs \
      --split=train=/data/a.json,/data/b.json --image_root=/data/img --out=/data/tfds

`--dataset` is a preset below (the ALBEF annotation file names each split reads from
`--data_dir`) or a builder of `simla_jax/data/tfds_builders.py` with `--split` given;
`--split name=file[,file]` replaces a preset's split or adds one. TFDS shows a progress
bar per split; the end prints examples, bytes and skipped records per split, and the
`data.tfds_name` a config sets to read the result. Exit status 1 when the build fails
(missing input, malformed record, more bad images than `--max_bad_fraction`).
"""

import argparse
import logging
import os
import sys
from typing import Any, Optional, Sequence

from simla_jax.data import tfds_builders
from train_jax import tfds_build

# dataset -> (builder, {split: [files under --data_dir]}, {option: file under --data_dir}).
# File names are those of ALBEF's released annotation bundle (data.tar.gz).
PRESETS: dict[str, tuple[str, dict[str, list[str]], dict[str, str]]] = {
    "coco_karpathy": ("simla_captions", {"train": ["coco_train.json"], "val": ["coco_val.json"],
                                         "test": ["coco_test.json"]}, {}),
    "flickr30k": ("simla_captions", {"train": ["flickr30k_train.json"],
                                     "val": ["flickr30k_val.json"],
                                     "test": ["flickr30k_test.json"]}, {}),
    "coco": ("simla_captions", {"train": ["coco.json"]}, {}),
    "vg": ("simla_captions", {"train": ["vg.json"]}, {}),
    "cc3m": ("simla_captions", {"train": ["cc3m_train.json", "cc3m_val.json"]}, {}),
    "sbu": ("simla_captions", {"train": ["sbu.json"]}, {}),
    "pretrain_4m": ("simla_captions", {"train": ["coco.json", "vg.json", "cc3m_train.json",
                                                 "cc3m_val.json", "sbu.json"]}, {}),
    "vqa": ("simla_vqa", {"train": ["vqa_train.json"], "val": ["vqa_val.json"],
                          "vg": ["vg_qa.json"], "test": ["vqa_test.json"]},
            {"answer_list": "answer_list.json"}),
    "nlvr2": ("simla_nlvr2", {"train": ["nlvr_train.json"], "dev": ["nlvr_dev.json"],
                              "test": ["nlvr_test.json"]}, {}),
    "snli_ve": ("simla_snli_ve", {"train": ["ve_train.json"], "dev": ["ve_dev.json"],
                                  "test": ["ve_test.json"]}, {}),
    "refcoco_plus": ("simla_refcoco", {"train": ["refcoco+_train.json"],
                                       "val": ["refcoco+_val.json"],
                                       "test": ["refcoco+_test.json"]},
                     {"dets": "refcoco+/dets.json"}),
    "shapes": ("simla_shapes", {"train": [], "val": [], "test": [], "comp": []}, {}),
}
ALIASES = {"captions": "simla_captions", "retrieval": "simla_captions"}


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m simla_jax.data.build", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", required=True,
                 help=f"preset ({', '.join(PRESETS)}) or builder "
                      f"({', '.join(tfds_builders.BUILDERS)}, captions)")
  p.add_argument("--out", required=True, help="TFDS data dir the build is written under")
  p.add_argument("--data_dir", default="", help="folder of the annotation files")
  p.add_argument("--image_root", default=None, help="images folder (default: --data_dir)")
  p.add_argument("--name", default="", help="config name (default: the dataset)")
  p.add_argument("--split", action="append", default=[], help="name=file[,file...]")
  p.add_argument("--option", action="append", default=[],
                 help="builder option key=value (vg_root, answer_list, dets, shapes.* ...)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing build")
  p.add_argument("--max_bad_fraction", type=float, default=1e-3,
                 help="fail a split when more of its records have a missing / corrupt image")
  return p


def resolve(args: argparse.Namespace) -> tuple[str, Any]:
  """Parsed flags -> (builder name, LocalConfig)."""
  dataset = args.dataset
  splits, options = {}, {}
  if dataset in PRESETS:
    builder, preset_splits, preset_options = PRESETS[dataset]
    if builder != "simla_shapes" and not args.data_dir:
      raise ValueError(f"--dataset={dataset} reads its files from --data_dir; give it")
    splits = {s: [os.path.join(args.data_dir, f) for f in files]
              for s, files in preset_splits.items()}
    for key, name in preset_options.items():
      path = os.path.join(args.data_dir, name)
      if os.path.exists(path):
        options[key] = path
      else:
        logging.warning("%s: optional %s not found at %s", dataset, key, path)
  else:
    builder = ALIASES.get(dataset, dataset)
    if builder not in tfds_builders.BUILDERS:
      raise ValueError(f"--dataset={dataset!r} is neither a preset ({', '.join(PRESETS)}) "
                       f"nor a builder ({', '.join(tfds_builders.BUILDERS)})")
  splits.update(tfds_build.parse_splits(args.split))
  options.update(tfds_build.parse_options(args.option))
  if not splits:
    raise ValueError(f"--dataset={dataset}: no splits; give --split=name=file[,file]")
  image_root = args.image_root if args.image_root is not None else args.data_dir
  config = tfds_builders.make_config(builder, args.name or dataset, splits,
                                     image_root=image_root,
                                     max_bad_fraction=args.max_bad_fraction, options=options)
  return builder, config


def read_hint(builder: str, config: Any, out: str) -> str:
  return (f"--config.data.source=tfds --config.data.tfds_dir={out} "
          f"--config.data.tfds_name={builder}/{config.name}")


def main(argv: Optional[Sequence[str]] = None) -> int:
  return tfds_build.cli_main(parser(), resolve, tfds_builders.build, read_hint, argv)


if __name__ == "__main__":
  sys.exit(main())
