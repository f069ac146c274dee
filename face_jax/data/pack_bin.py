"""Per-group image folders in the RFW layout -> insightface `.bin` verification packs.

  python -m face_jax.data.pack_bin --root RFW/test/data --pairs_dir RFW/test/txts --out packs/

Layout (Racial Faces in-the-Wild, Wang et al. 2019):
  <root>/<Group>/<identity>/<identity>_<NNNN>.jpg           aligned face crops
  <pairs_dir>/<Group>_pairs.txt  or  <pairs_dir>/<Group>/<Group>_pairs.txt
A pairs line (tabs or spaces) is a genuine pair `identity n1 n2` or an impostor pair
`identity1 n1 identity2 n2`; n is the image number (1-based, as in LFW's pairs.txt).

Output per group: <out>/<Group>.bin, the pickle of (bins, issame_list) that
`face_jax.data.verification.load_bin` and insightface read (pair k = images 2k, 2k + 1,
in the pairs file's order), and <out>/<Group>.json with each of the 2N images' name and
identity, so an evaluator can score every pair of the group's distinct images (TAR at a
small FAR needs far more impostors than a pair list holds). Image bytes are copied as
they are when the image already has the wanted size, else resized and re-encoded with
--resize. Missing images are all named before anything is written.
"""

import argparse
import json
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from face_jax.data import recordio
from face_jax.data import verification

NAME_FORMAT = "{identity}_{index:04d}.jpg"


def read_pairs(path: str) -> list[tuple[str, int, str, int]]:
  """RFW / LFW-style pairs file -> [(identity1, n1, identity2, n2)]; errors name file:line."""
  pairs = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      fields = line.split()
      if not fields:
        continue
      try:
        if len(fields) == 3:
          pairs.append((fields[0], int(fields[1]), fields[0], int(fields[2])))
        elif len(fields) == 4:
          pairs.append((fields[0], int(fields[1]), fields[2], int(fields[3])))
        else:
          raise ValueError(f"{path}:{n}: expected 3 fields (genuine) or 4 (impostor), "
                           f"got {len(fields)}: {line.rstrip()!r}")
      except ValueError as e:
        if str(e).startswith(path):
          raise
        raise ValueError(f"{path}:{n}: an image number is not an integer: {line.rstrip()!r}") from None
  if not pairs:
    raise ValueError(f"{path}: no pairs")
  return pairs


def pairs_file(pairs_dir: str, group: str) -> str:
  for path in (os.path.join(pairs_dir, f"{group}_pairs.txt"),
               os.path.join(pairs_dir, group, f"{group}_pairs.txt")):
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f"no pairs file for group {group!r}: looked for {group}_pairs.txt in "
                          f"{pairs_dir} and {os.path.join(pairs_dir, group)}")


def find_groups(root: str, pairs_dir: str) -> list[str]:
  """Subfolders of root that have a pairs file, sorted."""
  groups = []
  for name in sorted(os.listdir(root)):
    if os.path.isdir(os.path.join(root, name)):
      try:
        pairs_file(pairs_dir, name)
        groups.append(name)
      except FileNotFoundError:
        pass
  if not groups:
    raise ValueError(f"{root}: no group folder has a <Group>_pairs.txt in {pairs_dir}")
  return groups


def _encoded(path: str, size: Optional[tuple[int, int]], resize: bool, quality: int) -> bytes:
  with open(path, "rb") as f:
    data = f.read()
  image = recordio.decode_image(data, path)
  if size is None or image.shape[:2] == size:
    return data
  if not resize:
    raise ValueError(f"{path}: {image.shape[0]}x{image.shape[1]}, packs need {size[0]}x{size[1]} "
                     "aligned crops (pass --resize to resize)")
  image = np.asarray(Image.fromarray(image).resize(size[::-1], Image.Resampling.BILINEAR))
  return recordio.encode_jpeg(image, quality)


def pack_group(root: str, group: str, pairs_path: str, out_dir: str,
               image_size: Optional[tuple[int, int]] = (112, 112), resize: bool = False,
               name_format: str = NAME_FORMAT, quality: int = 95) -> str:
  """Writes <out_dir>/<group>.bin and <group>.json; returns the .bin path."""
  pairs = read_pairs(pairs_path)
  names, identities = [], []
  for id1, n1, id2, n2 in pairs:
    for identity, index in ((id1, n1), (id2, n2)):
      names.append(os.path.join(identity, name_format.format(identity=identity, index=index)))
      identities.append(identity)
  folder = os.path.join(root, group)
  missing = sorted({n for n in names if not os.path.isfile(os.path.join(folder, n))})
  if missing:
    shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
    raise FileNotFoundError(f"{pairs_path}: {len(missing)} images named in the pairs are missing "
                            f"under {folder}: {shown}")
  cache = {}
  for n in names:
    if n not in cache:
      cache[n] = _encoded(os.path.join(folder, n), image_size, resize, quality)
  issame = [id1 == id2 for id1, _, id2, _ in pairs]
  os.makedirs(out_dir, exist_ok=True)
  out = os.path.join(out_dir, f"{group}.bin")
  verification.write_bin(out, [cache[n] for n in names], issame)
  with open(os.path.join(out_dir, f"{group}.json"), "w") as f:
    json.dump({"group": group, "images": names, "identities": identities}, f)
  return out


def read_sidecar(bin_path: str, num_images: int) -> Optional[dict]:
  """The pack's <name>.json (image names and identities of its 2N images), or None."""
  path = os.path.splitext(bin_path)[0] + ".json"
  if not os.path.exists(path):
    return None
  with open(path) as f:
    side = json.load(f)
  for key in ("images", "identities"):
    if not isinstance(side.get(key), list) or len(side[key]) != num_images:
      raise ValueError(f"{path}: '{key}' must list the pack's {num_images} images")
  return side


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m face_jax.data.pack_bin", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", required=True, help="folder holding <Group>/<identity>/<image>")
  p.add_argument("--pairs_dir", default="", help="where the <Group>_pairs.txt are (default: --root)")
  p.add_argument("--out", required=True, help="output folder for <Group>.bin / <Group>.json")
  p.add_argument("--groups", default="", help="comma-separated groups (default: every group "
                                              "folder with a pairs file)")
  p.add_argument("--image_size", type=int, default=112, help="crop side; 0 accepts any size")
  p.add_argument("--resize", action="store_true", help="resize images of another size")
  p.add_argument("--name_format", default=NAME_FORMAT, help="image file name in an identity folder")
  p.add_argument("--jpeg_quality", type=int, default=95, help="for resized images")
  return p


def main(argv: Optional[Sequence[str]] = None) -> list[str]:
  args = parser().parse_args(argv)
  pairs_dir = args.pairs_dir or args.root
  groups = [g for g in args.groups.split(",") if g] or find_groups(args.root, pairs_dir)
  size = (args.image_size, args.image_size) if args.image_size else None
  outs = []
  for g in groups:
    outs.append(pack_group(args.root, g, pairs_file(pairs_dir, g), args.out, size, args.resize,
                           args.name_format, args.jpeg_quality))
    print(f"{g}: {outs[-1]}", flush=True)
  return outs


if __name__ == "__main__":
  main()
