"""RFW-layout folders -> .bin packs that round-trip through load_bin."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from face_jax.data import pack_bin
from face_jax.data.recordio import decode_image
from face_jax.data.verification import load_bin

IDS = {"African": ["m.01a", "m.02b", "m.03c"], "Asian": ["m.11x", "m.12y"]}
PAIRS = {"African": ["m.01a\t1\t2", "m.01a\t1\tm.02b\t3", "m.03c 2 1", "m.02b\t3\tm.03c\t1"],
         "Asian": ["m.11x\t1\t2", "m.11x\t2\tm.12y\t1"]}


def _tree(tmp_path, size=112, nested_pairs=False):
  root, txts = tmp_path / "data", tmp_path / "txts"
  rng = np.random.default_rng(0)
  for group, ids in IDS.items():
    for identity in ids:
      os.makedirs(root / group / identity)
      for n in (1, 2, 3):
        image = rng.integers(0, 255, (size, size, 3), np.uint8)
        Image.fromarray(image).save(root / group / identity / f"{identity}_{n:04d}.jpg")
    pairs_dir = txts / group if nested_pairs else txts
    os.makedirs(pairs_dir, exist_ok=True)
    (pairs_dir / f"{group}_pairs.txt").write_text("\n".join(PAIRS[group]) + "\n")
  return root, txts


def _source(root, group, identity, n):
  path = root / group / identity / f"{identity}_{n:04d}.jpg"
  return decode_image(path.read_bytes(), str(path))


@pytest.mark.parametrize("nested", [False, True])
def test_packs_round_trip_through_load_bin(tmp_path, nested):
  root, txts = _tree(tmp_path, nested_pairs=nested)
  outs = pack_bin.main(["--root", str(root), "--pairs_dir", str(txts), "--out", str(tmp_path / "out")])
  assert [os.path.basename(p) for p in outs] == ["African.bin", "Asian.bin"]
  images, issame = load_bin(tmp_path / "out" / "African.bin")
  np.testing.assert_array_equal(issame, [True, False, True, False])
  want = [("m.01a", 1), ("m.01a", 2), ("m.01a", 1), ("m.02b", 3), ("m.03c", 2), ("m.03c", 1),
          ("m.02b", 3), ("m.03c", 1)]
  assert images.shape == (8, 112, 112, 3)
  for k, (identity, n) in enumerate(want):
    np.testing.assert_array_equal(images[k], _source(root, "African", identity, n))
  side = pack_bin.read_sidecar(str(tmp_path / "out" / "African.bin"), 8)
  assert side["identities"] == [i for i, _ in want]
  assert side["images"][3] == os.path.join("m.02b", "m.02b_0003.jpg")
  images, issame = load_bin(tmp_path / "out" / "Asian.bin")
  np.testing.assert_array_equal(issame, [True, False])
  np.testing.assert_array_equal(images[3], _source(root, "Asian", "m.12y", 1))


def test_missing_images_are_all_named(tmp_path):
  root, txts = _tree(tmp_path)
  os.remove(root / "African" / "m.02b" / "m.02b_0003.jpg")
  os.remove(root / "African" / "m.03c" / "m.03c_0001.jpg")
  with pytest.raises(FileNotFoundError, match=r"2 images .* missing .*m.02b_0003.jpg, .*m.03c_0001.jpg"):
    pack_bin.main(["--root", str(root), "--pairs_dir", str(txts), "--out", str(tmp_path / "out"),
                   "--groups", "African"])
  assert not os.path.exists(tmp_path / "out" / "African.bin")


def test_other_sizes_refused_or_resized(tmp_path):
  root, txts = _tree(tmp_path, size=100)
  args = ["--root", str(root), "--pairs_dir", str(txts), "--out", str(tmp_path / "out"), "--groups", "Asian"]
  with pytest.raises(ValueError, match=r"m.11x_0001.jpg: 100x100, packs need 112x112"):
    pack_bin.main(args)
  pack_bin.main(args + ["--resize"])
  images, _ = load_bin(tmp_path / "out" / "Asian.bin")
  assert images.shape == (4, 112, 112, 3)


@pytest.mark.parametrize("line,match", [("m.01a 1", r"African_pairs.txt:2: expected 3 fields"),
                                        ("m.01a x 2", r"African_pairs.txt:2: an image number")])
def test_malformed_pair_lines_name_file_and_line(tmp_path, line, match):
  root, txts = _tree(tmp_path)
  (txts / "African_pairs.txt").write_text(f"m.01a 1 2\n{line}\n")
  with pytest.raises(ValueError, match=match):
    pack_bin.main(["--root", str(root), "--pairs_dir", str(txts), "--out", str(tmp_path / "o")])


def test_sidecar_with_wrong_length_is_refused(tmp_path):
  path = tmp_path / "x.bin"
  (tmp_path / "x.json").write_text(json.dumps({"images": ["a"], "identities": ["a"]}))
  assert pack_bin.read_sidecar(str(tmp_path / "none.bin"), 2) is None
  with pytest.raises(ValueError, match=r"x.json: 'images' must list the pack's 2 images"):
    pack_bin.read_sidecar(str(path), 2)
