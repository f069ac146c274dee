"""root/<identity>/<image> folders: stable ids, decoding, bad files, packing to .rec."""

import numpy as np
import pytest
from PIL import Image

from face_jax.data.folders import ImageFolder
from face_jax.data.recordio import BadRecordError, RecordIO, write_recordio


def _tree(root):
  spec = {  # identity -> [(file name, colour)]
      "m.02x": [("b.jpg", (200, 0, 0)), ("a.png", (0, 200, 0))],
      "Alice": [("1.JPEG", (0, 0, 200))],
      "zed": [],                                  # no images: keeps its id
      "c10": [("x.jpg", (90, 90, 90))],
      "c2": [("y.jpg", (10, 10, 10)), ("notes.txt", None), (".hidden.jpg", (1, 1, 1))],
  }
  for ident, files in spec.items():
    (root / ident).mkdir(parents=True)
    for name, color in files:
      if color is None:
        (root / ident / name).write_text("not an image")
      else:
        fmt = "PNG" if name.endswith("png") else "JPEG"
        Image.new("RGB", (12, 12), color).save(root / ident / name, format=fmt)
  (root / ".cache").mkdir()
  (root / "README").write_text("stray")
  return root


def test_sorted_identities_and_images(tmp_path):
  ds = ImageFolder(_tree(tmp_path / "faces"))
  assert ds.identity_names == ["Alice", "c10", "c2", "m.02x", "zed"]
  assert ds.num_classes == 5 and len(ds) == 5
  np.testing.assert_array_equal(ds.identity_ranges, [[0, 1], [1, 2], [2, 3], [3, 5], [5, 5]])
  np.testing.assert_array_equal(ds.labels, [0, 1, 2, 3, 3])
  assert [ds.path(i).rsplit("/", 2)[-2:] for i in range(5)] == [
      ["Alice", "1.JPEG"], ["c10", "x.jpg"], ["c2", "y.jpg"], ["m.02x", "a.png"],
      ["m.02x", "b.jpg"]]
  ex = ds[3]
  assert ex["label"] == 3 and ex["image"].shape == (12, 12, 3) and ex["image"].dtype == np.uint8
  assert tuple(ex["image"][0, 0]) == (0, 200, 0)                 # PNG is exact
  np.testing.assert_allclose(ds[4]["image"].reshape(-1, 3).mean(0), (200, 0, 0), atol=3)


def test_ids_do_not_move_when_images_are_added(tmp_path):
  root = _tree(tmp_path / "faces")
  before = ImageFolder(root).identity_names
  Image.new("RGB", (12, 12)).save(root / "c10" / "new.jpg")
  after = ImageFolder(root)
  assert after.identity_names == before and after.labels[2] == 1


def test_bad_files_and_roots(tmp_path):
  root = _tree(tmp_path / "faces")
  (root / "c2" / "y.jpg").write_bytes(b"\xff\xd8 truncated")
  ds = ImageFolder(root)
  with pytest.raises(BadRecordError, match=r"faces/c2/y\.jpg: "):
    ds[2]
  with pytest.raises(IndexError):
    ds[5]
  with pytest.raises(FileNotFoundError, match="missing"):
    ImageFolder(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="has no identity folders"):
    ImageFolder(tmp_path / "empty")
  (tmp_path / "empty" / "someone").mkdir()
  with pytest.raises(ValueError, match="no images"):
    ImageFolder(tmp_path / "empty")


def test_pack_folder_into_recordio_without_reencoding(tmp_path):
  ds = ImageFolder(_tree(tmp_path / "faces"))
  n = write_recordio(tmp_path / "train", ds.encoded_examples(), num_classes=ds.num_classes)
  rec = RecordIO(tmp_path / "train")
  assert n == len(rec) == len(ds) and rec.num_classes == ds.num_classes
  np.testing.assert_array_equal(rec.identity_ranges, ds.identity_ranges)
  for i in range(len(ds)):
    assert rec.read(i) == ds.read(i)                  # the file bytes, unchanged
  assert (tmp_path / "property").read_text() == "5,12,12"
