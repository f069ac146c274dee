"""Insightface verification packs (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...).

A pack is a pickle of `(bins, issame_list)`: `bins` holds 2N encoded images (JPEG
byte strings; py2-era packs need `encoding="bytes"`; newer ones may hold uint8 arrays
from `cv2.imencode`), pair k is (bins[2k], bins[2k + 1]) and `issame_list[k]` says
whether both show one person (spec mvcom.md §4.5).

A pickle can run any code it names, so `load_bin` unpickles with an allow-list of the
globals such packs contain (numpy array / dtype / scalar reconstruction and the latin-1
`_codecs.encode` of protocol-2 byte strings) and refuses the rest before anything is
called, naming the file, the global and its byte offset.
"""

import concurrent.futures
import io
import os
import pickle
import pickletools
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np

from face_jax.data.recordio import decode_image, encode_jpeg

PathLike = Union[str, os.PathLike]

_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMPY_NUMERIC = ("numpy.core.numeric", "numpy._core.numeric")


# numpy.ndarray only ever appears as the first argument of `_reconstruct`; a token
# (not the class) keeps a pickle from calling the constructor itself.
_NDARRAY = object()


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle names a global outside the verification-pack allow-list."""


def _checked_dtype(dtype: Any, where: str) -> np.dtype:
  if isinstance(dtype, bytes):  # py2 pickles read with encoding="bytes"
    dtype = dtype.decode("latin-1")
  dtype = np.dtype(dtype)
  if dtype.kind not in "biu" or dtype.fields is not None:
    raise UnsafePickleError(f"{where}: numpy dtype {dtype} is not one a verification pack "
                            "uses (bool / integer)")
  return dtype


def _allowed_globals(where: str) -> dict[tuple[str, str], Callable[..., Any]]:
  """(module, name) -> a callable that rebuilds only what a pack may hold."""

  def dtype(name, align=False, copy=False):
    del align, copy  # no effect on the plain dtypes allowed here
    return _checked_dtype(name, where)

  def reconstruct(subtype, shape, dtype_code):
    if subtype is not _NDARRAY:
      raise UnsafePickleError(f"{where}: array subtype {subtype!r} is not numpy.ndarray")
    del dtype_code  # the real dtype arrives with __setstate__ (checked afterwards)
    return np.ndarray.__new__(np.ndarray, shape, np.uint8)

  def frombuffer(buf, dtype_, shape, order):
    dtype_ = _checked_dtype(dtype_, where)
    return np.frombuffer(buf, dtype_).reshape(shape, order=order).copy()

  def scalar(dtype_, data=None):
    dtype_ = _checked_dtype(dtype_, where)
    return np.frombuffer(data, dtype_, 1)[0]

  def encode(text, encoding="utf-8"):
    # Protocol 2 stores py3 bytes as _codecs.encode(str, "latin1").
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
      raise UnsafePickleError(f"{where}: _codecs.encode with {encoding!r} is not a byte string")
    return text.encode("latin-1")

  table = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): dtype,
           ("_codecs", "encode"): encode}
  for module in _NUMPY_CORE:
    table[(module, "_reconstruct")] = reconstruct
    table[(module, "scalar")] = scalar
  for module in _NUMPY_NUMERIC:
    table[(module, "_frombuffer")] = frombuffer
  for module in ("builtins", "__builtin__"):
    for name, fn in (("bytes", bytes), ("bytearray", bytearray), ("bool", bool),
                     ("list", list), ("tuple", tuple)):
      table[(module, name)] = fn
  return table


def _global_offset(data: bytes, module: str, name: str) -> Optional[int]:
  """Byte offset of the opcode that loads module.name (for the error message only)."""
  strings, memo = [], {}
  try:
    for op, arg, pos in pickletools.genops(data):
      if op.name in ("GLOBAL", "INST") and arg == f"{module} {name}":
        return pos
      if op.name == "STACK_GLOBAL" and strings[-2:] == [module, name]:
        return pos
      if isinstance(arg, (str, bytes)) and ("UNICODE" in op.name or "STRING" in op.name):
        strings.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
      elif op.name == "MEMOIZE":
        memo[len(memo)] = strings[-1] if strings else None
      elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
        memo[arg] = strings[-1] if strings else None
      elif op.name in ("GET", "BINGET", "LONG_BINGET"):
        strings.append(memo.get(arg))
  except Exception:  # pylint: disable=broad-except  # malformed pickle: no offset
    return None
  return None


class _Unpickler(pickle.Unpickler):
  """Looks up globals only in the verification-pack allow-list."""

  def __init__(self, file, where: str):
    super().__init__(file, encoding="bytes")
    self._where = where
    self._table = _allowed_globals(where)

  def find_class(self, module: str, name: str) -> Any:
    if isinstance(module, bytes):
      module = module.decode("latin-1")
    if isinstance(name, bytes):
      name = name.decode("latin-1")
    fn = self._table.get((module, name))
    if fn is None:
      raise UnsafePickleError(module, name)
    return fn

  def persistent_load(self, pid: Any) -> Any:
    raise UnsafePickleError(f"{self._where}: persistent id {pid!r} is not allowed")


def _as_bytes(item: Any, k: int, where: str) -> bytes:
  if isinstance(item, (bytes, bytearray)):
    return bytes(item)
  if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim in (1, 2):
    return item.tobytes()  # cv2.imencode output: (n,) or (n, 1) uint8
  raise ValueError(f"{where}: image {k} is a {type(item).__name__}"
                   f"{getattr(item, 'shape', '')}, expected encoded bytes or a uint8 array")


def _as_issame(issame: Any, where: str) -> np.ndarray:
  if isinstance(issame, np.ndarray):
    values = issame.ravel()
  elif isinstance(issame, (list, tuple)):
    values = issame
  else:
    raise ValueError(f"{where}: issame_list is a {type(issame).__name__}, expected a list of bools")
  out = np.empty(len(values), bool)
  for k, v in enumerate(values):
    if not isinstance(v, (bool, np.bool_, int, np.integer)) or v not in (0, 1):
      raise ValueError(f"{where}: issame_list[{k}] = {v!r} is not a bool")
    out[k] = bool(v)
  return out


def read_bin(path: PathLike) -> tuple[list[bytes], np.ndarray]:
  """Verification pack -> (2N encoded images as bytes, issame bool (N,)), not decoded.

  Raises `UnsafePickleError` / `ValueError` as `load_bin` does for the pickle itself.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    data = f.read()
  try:
    obj = _Unpickler(io.BytesIO(data), path).load()
  except UnsafePickleError as e:
    if len(e.args) == 2:
      module, name = e.args
      offset = _global_offset(data, module, name)
      at = f" at byte offset {offset}" if offset is not None else ""
      raise UnsafePickleError(
          f"{path}: the pickle refers to global '{module}.{name}'{at}; a verification pack "
          "holds only bytes, bools and uint8 numpy arrays, so it was refused and nothing in "
          "it was run") from None
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
          IndexError, KeyError, MemoryError) as e:
    raise ValueError(f"{path}: not a readable verification pack pickle "
                     f"({type(e).__name__}: {e})") from None
  if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
    length = f" of length {len(obj)}" if hasattr(obj, "__len__") else ""
    raise ValueError(f"{path}: expected the pickle of (bins, issame_list), got "
                     f"{type(obj).__name__}{length}")
  bins, issame = obj
  if not isinstance(bins, (list, tuple)):
    raise ValueError(f"{path}: bins is a {type(bins).__name__}, expected a list of images")
  issame = _as_issame(issame, path)
  if len(bins) != 2 * len(issame):
    raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs "
                     f"(expected {2 * len(issame)})")
  return [_as_bytes(item, k, path) for k, item in enumerate(bins)], issame


def load_bin(path: PathLike, image_size: Optional[tuple[int, int]] = (112, 112),
             num_threads: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Verification pack -> (images uint8 (2N, H, W, 3) RGB, issame bool (N,)).

  Args:
    path: the `.bin` file.
    image_size: (H, W) every image must have; None accepts any size shared by all.
    num_threads: decoding threads (JPEG decoding releases the GIL).
  Raises:
    UnsafePickleError: the pickle names a global outside the allow-list (nothing of it
      was called).
    ValueError: the pickle is not `(bins, issame_list)`, counts disagree, or an image
      cannot be decoded or has another size; the message names the file and image.
  """
  path = os.fspath(path)
  encoded, issame = read_bin(path)
  return decode_pairs(encoded, issame, path, image_size, num_threads)


def decode_pairs(encoded: Sequence[bytes], issame: np.ndarray, path: str,
                 image_size: Optional[tuple[int, int]] = (112, 112),
                 num_threads: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """2N encoded images -> (uint8 (2N, H, W, 3), issame); errors name `path` and image."""

  def decode(k: int) -> np.ndarray:
    return decode_image(encoded[k], f"{path}: image {k} (pair {k // 2})")

  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    images = list(pool.map(decode, range(len(encoded))))
  want = tuple(image_size) if image_size is not None else (images[0].shape[:2] if images else None)
  for k, image in enumerate(images):
    if image.shape[:2] != want:
      raise ValueError(f"{path}: image {k} (pair {k // 2}) is {image.shape[0]}x{image.shape[1]}, "
                       f"expected {want[0]}x{want[1]} (images must be aligned crops)")
  shape = (0, *(want or (0, 0)), 3)
  return (np.stack(images) if images else np.zeros(shape, np.uint8)), issame


def write_bin(path: PathLike, images: Union[np.ndarray, Sequence[Any]],
              issame: Iterable[bool], *, jpeg_quality: int = 95) -> None:
  """Writes a verification pack that insightface's own loader also reads.

  Args:
    path: output `.bin`.
    images: 2N images, pair k = (images[2k], images[2k+1]); each a uint8 (H, W, 3) RGB
      array (JPEG-encoded here) or already encoded bytes.
    issame: N bools.
    jpeg_quality: for images given as arrays.
  """
  issame = [bool(x) for x in issame]
  bins = [bytes(im) if isinstance(im, (bytes, bytearray)) else encode_jpeg(im, jpeg_quality)
          for im in images]
  if len(bins) != 2 * len(issame):
    raise ValueError(f"write_bin: {len(bins)} images for {len(issame)} pairs")
  with open(path, "wb") as f:
    # Protocol 4: bytes and bools only (no globals), readable by any Python 3 loader.
    pickle.dump((bins, issame), f, protocol=4)
