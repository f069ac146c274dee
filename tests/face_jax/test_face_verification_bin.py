"""Verification `.bin` packs: py2/py3 pickles built by hand, numpy variants, refusals."""

import io
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from face_jax.data.verification import UnsafePickleError, load_bin, write_bin


def jpeg(color, size=(112, 112)) -> bytes:
  out = io.BytesIO()
  Image.new("RGB", size[::-1], color).save(out, format="JPEG", quality=95)
  return out.getvalue()


COLORS = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (240, 240, 10)]


def py2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
  """What `cPickle.dump((bins, issame_list), f, protocol=2)` wrote under Python 2,
  opcode by opcode: py2 `str` is BINSTRING / SHORT_BINSTRING, bools NEWTRUE/NEWFALSE."""
  out = [b"\x80\x02", b"]q\x00(" ]           # PROTO 2, EMPTY_LIST, BINPUT 0, MARK
  for n, data in enumerate(bins):
    if len(data) < 256:
      out.append(b"U" + bytes([len(data)]) + data)          # SHORT_BINSTRING
    else:
      out.append(b"T" + struct.pack("<i", len(data)) + data)  # BINSTRING
    out.append(b"q" + bytes([n + 1]))                        # BINPUT
  out.append(b"e")                                           # APPENDS
  out.append(b"]q" + bytes([len(bins) + 1]) + b"(")
  out += [b"\x88" if s else b"\x89" for s in issame]         # NEWTRUE / NEWFALSE
  out.append(b"e\x86q" + bytes([len(bins) + 2]) + b".")      # APPENDS, TUPLE2, BINPUT, STOP
  return b"".join(out)


def test_write_then_load(tmp_path):
  images = np.stack([np.full((112, 112, 3), c, np.uint8) for c in COLORS])
  write_bin(tmp_path / "mine.bin", images, [True, False])
  got, issame = load_bin(tmp_path / "mine.bin")
  assert got.shape == (4, 112, 112, 3) and got.dtype == np.uint8
  assert issame.dtype == bool and issame.tolist() == [True, False]
  np.testing.assert_allclose(got.astype(float), images, atol=3)
  # The file is a plain pickle that insightface's own loader reads.
  with open(tmp_path / "mine.bin", "rb") as f:
    bins, same = pickle.load(f, encoding="bytes")
  assert all(isinstance(b, bytes) for b in bins) and same == [True, False]


def test_py2_era_pack_built_by_hand(tmp_path):
  bins = [jpeg(c) for c in COLORS]
  assert all(len(b) >= 256 for b in bins)
  (tmp_path / "lfw.bin").write_bytes(py2_pickle(bins, [False, True]))
  images, issame = load_bin(tmp_path / "lfw.bin")
  assert images.shape == (4, 112, 112, 3) and issame.tolist() == [False, True]
  for img, c in zip(images, COLORS):
    np.testing.assert_allclose(img.reshape(-1, 3).mean(0), c, atol=3)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_arrays_as_from_cv2_imencode(tmp_path, protocol):
  # cv2.imencode returns uint8 (n, 1); issame as a numpy bool array or numpy bools.
  bins = [np.frombuffer(jpeg(c), np.uint8).reshape(-1, 1) for c in COLORS]
  for issame in (np.array([True, False]), [np.bool_(True), np.bool_(False)]):
    with open(tmp_path / "cfp_fp.bin", "wb") as f:
      pickle.dump((bins, issame), f, protocol=protocol)
    images, same = load_bin(tmp_path / "cfp_fp.bin")
    assert images.shape == (4, 112, 112, 3) and same.tolist() == [True, False]


class _Boom:
  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    import os  # pylint: disable=import-outside-toplevel
    return (os.system, (f"touch {self.target}",))


class _Eval:
  def __reduce__(self):
    return (eval, ("1 + 1",))


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_refuses_any_other_global_and_runs_nothing(tmp_path, protocol):
  marker = tmp_path / "pwned"
  path = tmp_path / "agedb_30.bin"
  with open(path, "wb") as f:
    pickle.dump(([jpeg(COLORS[0]), _Boom(marker)], [True]), f, protocol=protocol)
  with pytest.raises(UnsafePickleError, match=r"agedb_30\.bin: the pickle refers to global "
                     r"'posix\.system' at byte offset \d+; .* nothing in it was run"):
    load_bin(path)
  assert not marker.exists()
  with open(path, "wb") as f:
    pickle.dump(([_Eval()], []), f, protocol=protocol)
  with pytest.raises(UnsafePickleError, match=r"global '(__builtin__|builtins)\.eval'"):
    load_bin(path)


def test_refuses_object_arrays_and_numpy_functions(tmp_path):
  path = tmp_path / "x.bin"
  with open(path, "wb") as f:
    pickle.dump(([np.array([b"a", None], dtype=object)], []), f, protocol=2)
  with pytest.raises(UnsafePickleError, match=r"x\.bin: numpy dtype object"):
    load_bin(path)
  # A global spelled by hand (protocol 0 GLOBAL opcode), e.g. numpy.load.
  path.write_bytes(b"cnumpy\nload\n(S'f.npy'\ntR.")
  with pytest.raises(UnsafePickleError, match=r"'numpy\.load' at byte offset 0"):
    load_bin(path)


def test_structure_errors_name_the_file_and_image(tmp_path):
  path = tmp_path / "bad.bin"
  cases = [
      (([jpeg(COLORS[0])] * 3, [True]), r"3 images for 1 pairs"),
      (([jpeg(COLORS[0])] * 2, [2]), r"issame_list\[0\] = 2 is not a bool"),
      (([jpeg(COLORS[0]), 5], [True]), r"image 1 is a int"),
      ([1, 2, 3], r"expected the pickle of \(bins, issame_list\), got list of length 3"),
      (([jpeg(COLORS[0]), jpeg(COLORS[1])[:100]], [True]), r"image 1 \(pair 0\)"),
      (([jpeg(COLORS[0]), jpeg(COLORS[1], (96, 112))], [True]),
       r"image 1 \(pair 0\) is 96x112, expected 112x112"),
  ]
  for obj, message in cases:
    with open(path, "wb") as f:
      pickle.dump(obj, f, protocol=4)
    with pytest.raises(ValueError, match=rf"bad\.bin: .*{message}"):
      load_bin(path)
  path.write_bytes(b"\x80\x04garbage")
  with pytest.raises(ValueError, match=r"bad\.bin: not a readable verification pack"):
    load_bin(path)


def test_other_image_sizes_when_asked(tmp_path):
  write_bin(tmp_path / "s.bin", [jpeg(COLORS[0], (96, 80)), jpeg(COLORS[1], (96, 80))], [True])
  images, _ = load_bin(tmp_path / "s.bin", image_size=None)
  assert images.shape == (2, 96, 80, 3)
