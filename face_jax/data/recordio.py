"""MXNet RecordIO packs (`train.rec` + `train.idx` + `property`) without mxnet.

The layout (spec mvcom.md §4.5), all little-endian:

  record  := chunk+        one logical record; several chunks only when the writer
                           found the magic word at a 4-byte-aligned payload offset
  chunk   := uint32 magic 0xCED7230A, uint32 lrecord, payload[length], zero pad to 4
  lrecord := cflag << 29 | length;  cflag 0 whole, 1 first, 2 middle, 3 last part
                           (the reader puts the 4 magic bytes back between parts)
  payload := IRHeader '<IfQQ' (flag, label, id, id2)
             [+ flag float32 labels when flag > 0] + encoded image
  .idx    := text lines "<key>\\t<byte offset of the record's first chunk>\\n"

InsightFace packs (MS1MV2 / MS1MV3 / Glint360K, ...) put a header at key 0: flag 2,
no image, label [A, B]. Images are keys 1 .. A-1; keys A .. B-1 are one record per
identity (flag 2, no image, label [start, end) = its image keys). An im2rec pack has
no header: every key is an image. `property` holds "num_classes,height,width".

`RecordIO` is a random-access grain source. It reads with `os.pread` (no shared file
position) through one descriptor per process, so grain's worker threads and processes
can share it. Per-record problems raise `BadRecordError` (a `ValueError`) naming the
file, key and byte offset; the pipeline skips and counts those. A pack whose index or
header is broken fails at construction: nothing half-loaded is returned.
"""

import io
import logging
import math
import os
import struct
import threading
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np
from PIL import Image

try:  # libjpeg-turbo, faster than Pillow on JPEG; optional.
  import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
  simplejpeg = None

log = logging.getLogger(__name__)

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_CHUNK = struct.Struct("<II")            # magic, lrecord
_IR_HEADER = struct.Struct("<IfQQ")      # flag, label, id, id2 (24 bytes)
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
# Record numbers in the insightface header are float32 labels: exact up to 2**24.
_FLOAT32_EXACT = 1 << 24
# First read of a record: enough for a whole 112x112 JPEG record in one syscall,
# small enough that an index listing few records does not read the file whole.
_FIRST_READ_BYTES = 1 << 16

PathLike = Union[str, os.PathLike]


class BadRecordError(ValueError):
  """One record cannot be read or decoded. The message names file, key and offset."""


def decode_image(buf: bytes, where: str) -> np.ndarray:
  """Encoded image (JPEG, PNG, ...) -> uint8 (H, W, 3) RGB.

  simplejpeg (when installed) handles JPEG; Pillow everything else and whatever
  simplejpeg refuses. Undecodable bytes raise `BadRecordError` naming `where`.
  """
  if not buf:
    raise BadRecordError(f"{where}: no image bytes")
  if simplejpeg is not None and buf[:2] == b"\xff\xd8":
    try:
      return simplejpeg.decode_jpeg(buf, colorspace="RGB")
    except ValueError:
      pass  # e.g. CMYK or progressive corner cases: let Pillow try.
  try:
    with Image.open(io.BytesIO(buf)) as img:
      img.load()  # Pillow decodes lazily; force it inside the try.
      rgb = img.convert("RGB")
    return np.asarray(rgb, dtype=np.uint8)
  except Image.UnidentifiedImageError:
    raise BadRecordError(f"{where}: not an image format Pillow knows "
                         f"(first bytes {buf[:8]!r})") from None
  except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
    raise BadRecordError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from None


def unpack_payload(payload: bytes, where: str) -> tuple[int, np.ndarray, bytes]:
  """Record payload -> (flag, float32 labels, image bytes).

  `labels` is the scalar `label` field as a 1-vector when flag is 0, else the
  `flag` float32 values that follow the IRHeader.
  """
  if len(payload) < _IR_HEADER.size:
    raise BadRecordError(f"{where}: payload of {len(payload)} bytes is shorter than the "
                         f"{_IR_HEADER.size}-byte IRHeader")
  flag, label, _, _ = _IR_HEADER.unpack_from(payload)
  if flag == 0:
    return 0, np.array([label], np.float32), payload[_IR_HEADER.size:]
  end = _IR_HEADER.size + 4 * flag
  if end > len(payload):
    raise BadRecordError(
        f"{where}: label flag {flag} announces {flag} float32 labels ({4 * flag} bytes) "
        f"but only {len(payload) - _IR_HEADER.size} bytes follow the IRHeader")
  return flag, np.frombuffer(payload, "<f4", flag, _IR_HEADER.size).copy(), payload[end:]


def _class_id(labels: np.ndarray, where: str) -> int:
  value = float(labels[0])
  if not (math.isfinite(value) and value >= 0 and value == int(value)):
    raise BadRecordError(f"{where}: label {value!r} is not a class id (a non-negative integer)")
  return int(value)


def _record_number(value: float, what: str, where: str) -> int:
  if not (math.isfinite(value) and value >= 0 and value == int(value)):
    raise ValueError(f"{where}: {what} {value!r} is not a record number")
  return int(value)


def _read_idx(idx_path: str, rec_size: int, rec_path: str) -> tuple[np.ndarray, np.ndarray]:
  """`.idx` -> (keys, offsets), both int64 in file order, validated against `.rec`."""
  with open(idx_path, "rb") as f:
    data = f.read()
  lines = data.splitlines()
  while lines and not lines[-1].strip():
    lines.pop()
  tokens = data.split()
  keys = offsets = None
  if len(tokens) == 2 * len(lines):
    try:
      pairs = np.array(tokens).astype(np.int64).reshape(-1, 2)
      keys, offsets = pairs[:, 0], pairs[:, 1]
    except ValueError:
      pass
  if keys is None:  # Slow path, only to name the first malformed line.
    for n, line in enumerate(lines, 1):
      fields = line.split()
      if len(fields) != 2 or not all(x.lstrip(b"-").isdigit() for x in fields):
        raise ValueError(f"{idx_path}: line {n} is {line[:80]!r}, expected '<key>\\t<offset>'")
    raise ValueError(f"{idx_path}: malformed index")  # pragma: no cover
  if not len(keys):
    raise ValueError(f"{idx_path}: the index lists no records")
  bad = np.flatnonzero((offsets < 0) | (offsets + _CHUNK.size > rec_size))
  if bad.size:
    i = bad[0]
    raise ValueError(f"{idx_path}: line {i + 1}: key {keys[i]} has offset {offsets[i]}, "
                     f"past the end of {rec_path} ({rec_size} bytes)")
  bad = np.flatnonzero(offsets % 4)
  if bad.size:
    i = bad[0]
    raise ValueError(f"{idx_path}: line {i + 1}: key {keys[i]} has offset {offsets[i]}, "
                     f"which is not 4-byte aligned as every RecordIO record is")
  sorted_keys = np.sort(keys)
  dup = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
  if dup.size:
    raise ValueError(f"{idx_path}: key {sorted_keys[dup[0]]} is listed twice")
  return keys, offsets


def _read_property(path: str) -> Optional[int]:
  """`property` ("num_classes,height,width") -> num_classes, or None if absent."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    text = f.read().strip()
  fields = [x.strip() for x in text.split(",")]
  if not fields[0].isdigit():
    raise ValueError(f"{path}: expected 'num_classes,height,width', got {text[:80]!r}")
  return int(fields[0])


class RecordIO:
  """Random access to the images of `prefix.rec` / `prefix.idx` (grain source).

  `ds[i]` -> {"image": uint8 (H, W, 3) RGB, "label": int}, i in [0, len(ds)).
  Image i is key i + 1 in an insightface pack, the i-th `.idx` line otherwise.

  Attributes:
    rec_path, idx_path, property_path: the files.
    insightface_header: (A, B) from key 0, or None for an im2rec pack.
    num_classes: from `property`, else the header's identity records, else the
      largest image label + 1 (one pass over all record headers, done on demand).
    identity_ranges: int64 (num_classes, 2), [start, end) image indices of each
      identity, for class-aware sampling (see the property).
  """

  def __init__(self, prefix: PathLike, *, rec_path: Optional[PathLike] = None,
               idx_path: Optional[PathLike] = None):
    prefix = os.fspath(prefix)
    self.rec_path = os.fspath(rec_path) if rec_path is not None else prefix + ".rec"
    self.idx_path = os.fspath(idx_path) if idx_path is not None else prefix + ".idx"
    self.property_path = os.path.join(os.path.dirname(self.rec_path), "property")
    for path in (self.rec_path, self.idx_path):
      if not os.path.isfile(path):
        raise FileNotFoundError(f"RecordIO: {path} does not exist")
    self._size = os.path.getsize(self.rec_path)
    keys, offsets = _read_idx(self.idx_path, self._size, self.rec_path)
    # Keys 0..n-1 in order (every insightface and im2rec pack) index directly.
    self._dense = bool(np.array_equal(keys, np.arange(len(keys))))
    self._keys = None if self._dense else keys
    self._key_order = None if self._dense else np.argsort(keys)
    self._offsets = offsets
    # A record may not run past the start of the next one in the file.
    ends = np.unique(np.append(offsets, self._size))
    self._ends = ends
    self._fd = None
    self._fd_pid = None
    self._lock = threading.Lock()

    self._ranges: Optional[np.ndarray] = None
    self._labels: Optional[np.ndarray] = None
    self.insightface_header = None
    self._first_image_key = None
    self._num_images = len(keys)
    self._identity_keys = None

    property_classes = _read_property(self.property_path)
    if self._has_key(0):
      where0 = self._where(0)
      flag, labels, image = unpack_payload(self._read_payload(self._position(0)), where0)
      if flag > 0 and not image:  # A record without image bytes: insightface header.
        self._init_insightface_header(flag, labels, where0)
    self._num_classes = property_classes
    if self._identity_keys is not None:
      identities = self._identity_keys[1] - self._identity_keys[0]
      if self._num_classes is None:
        self._num_classes = identities
      elif self._num_classes != identities:
        log.warning("%s says %d classes but %s has %d identity records; using %d (a property "
                    "file describes the folder's training pack)", self.property_path,
                    self._num_classes, self.rec_path, identities, self._num_classes)

  # --- header -------------------------------------------------------------

  def _init_insightface_header(self, flag: int, labels: np.ndarray, where0: str) -> None:
    if flag != 2:
      raise ValueError(f"{where0}: the insightface header record (no image bytes) has label "
                       f"flag {flag}; it must be 2 (label = [first identity key, end key])")
    a = _record_number(float(labels[0]), "header label[0] (first identity key)", where0)
    b = _record_number(float(labels[1]), "header label[1] (end of identity keys)", where0)
    if a < 1:
      raise ValueError(f"{where0}: header label[0] = {a}; images are keys 1..{a - 1}")
    if a >= _FLOAT32_EXACT:
      log.warning("%s: %d images exceed float32's exact integers; header record numbers "
                  "may be off by one (image labels are unaffected)", where0, a - 1)
    for key in (1, a - 1):
      if a > 1 and not self._has_key(key):
        raise ValueError(f"{where0}: header says images are keys 1..{a - 1} but "
                         f"{self.idx_path} has no key {key}")
    self.insightface_header = (a, b)
    self._first_image_key = 1
    self._num_images = a - 1
    # Tools that only write the header (no identity records) leave label[1] as the
    # class count or anything else: identity records exist only if their keys do.
    if b > a and self._has_key(a) and self._has_key(b - 1):
      self._identity_keys = (a, b)

  # --- index --------------------------------------------------------------

  def _has_key(self, key: int) -> bool:
    if self._dense:
      return 0 <= key < len(self._offsets)
    j = np.searchsorted(self._keys, key, sorter=self._key_order)
    return j < len(self._keys) and self._keys[self._key_order[j]] == key

  def _position(self, key: int) -> int:
    if self._dense:
      return key
    j = np.searchsorted(self._keys, key, sorter=self._key_order)
    if j >= len(self._keys) or self._keys[self._key_order[j]] != key:
      raise BadRecordError(f"{self.rec_path}: key {key} is not in {self.idx_path}")
    return int(self._key_order[j])

  def _where(self, key: int, offset: Optional[int] = None) -> str:
    if offset is None:
      offset = int(self._offsets[self._position(key)])
    return f"{self.rec_path}: record key {key} at offset {offset}"

  def _image_key(self, i: int) -> int:
    n = self._num_images
    if not -n <= i < n:
      raise IndexError(f"{self.rec_path}: image index {i} out of range [0, {n})")
    i %= n
    if self._first_image_key is not None:
      return self._first_image_key + i
    return i if self._dense else int(self._keys[i])

  # --- file access --------------------------------------------------------

  def _descriptor(self) -> int:
    # One descriptor per process: a forked grain worker must not share the parent's.
    pid = os.getpid()
    if self._fd is None or self._fd_pid != pid:
      with self._lock:
        if self._fd is None or self._fd_pid != pid:
          self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
          self._fd_pid = pid
    return self._fd

  def _pread(self, size: int, offset: int) -> bytes:
    fd = self._descriptor()
    if hasattr(os, "pread"):
      return os.pread(fd, size, offset)
    with self._lock:  # pragma: no cover - Windows: no pread, share the position safely
      os.lseek(fd, offset, os.SEEK_SET)
      return os.read(fd, size)

  def _read_payload(self, pos: int, limit: Optional[int] = None) -> bytes:
    """Reassembles the record at `.idx` position `pos` (stops early once `limit`
    payload bytes are known, for label-only reads)."""
    key = pos if self._dense else int(self._keys[pos])
    start = int(self._offsets[pos])
    end = int(self._ends[np.searchsorted(self._ends, start, side="right")])
    bound = "the end of the file" if end == self._size else f"the next record at offset {end}"
    first = _FIRST_READ_BYTES if limit is None else _CHUNK.size + limit
    buf = self._pread(min(end - start, first), start)
    parts, p, got = [], 0, 0

    def need(n: int) -> None:
      nonlocal buf
      if p + n > len(buf) and start + len(buf) < end:
        buf += self._pread(min(end - start, p + n + _FIRST_READ_BYTES) - len(buf),
                           start + len(buf))

    while True:
      need(_CHUNK.size)
      if p + _CHUNK.size > len(buf):
        raise BadRecordError(f"{self._where(key, start)}: truncated: a chunk header at offset "
                             f"{start + p} runs past {bound}")
      magic, lrecord = _CHUNK.unpack_from(buf, p)
      if magic != MAGIC:
        raise BadRecordError(f"{self._where(key, start)}: wrong magic 0x{magic:08X} at offset "
                             f"{start + p} (expected 0x{MAGIC:08X})")
      cflag, length = lrecord >> _LENGTH_BITS, lrecord & _LENGTH_MASK
      if cflag not in ((0, 1) if not parts else (2, 3)):
        raise BadRecordError(f"{self._where(key, start)}: chunk at offset {start + p} has "
                             f"continuation flag {cflag} after {len(parts)} part(s)")
      p += _CHUNK.size
      want = length if limit is None else min(length, max(limit - got, 0))
      need(want)
      if p + want > len(buf):
        raise BadRecordError(f"{self._where(key, start)}: truncated: chunk at offset "
                             f"{start + p - _CHUNK.size} declares {length} payload bytes but "
                             f"only {len(buf) - p} remain before {bound}")
      parts.append(buf[p:p + want])
      got += want + (4 if cflag in (1, 2) else 0)
      if cflag in (0, 3) or (limit is not None and got >= limit):
        return _MAGIC_BYTES.join(parts)
      p += (length + 3) & ~3

  def __getstate__(self) -> dict[str, Any]:
    state = self.__dict__.copy()
    state.update(_fd=None, _fd_pid=None, _lock=None)  # reopened lazily per process
    return state

  def __setstate__(self, state: Mapping[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def close(self) -> None:
    if self._fd is not None and self._fd_pid == os.getpid():
      os.close(self._fd)
    self._fd = self._fd_pid = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  # interpreter shutdown
      pass

  # --- public -------------------------------------------------------------

  def __len__(self) -> int:
    return self._num_images

  def _read_image(self, key: int) -> tuple[int, bytes, str]:
    where = self._where(key)
    _, labels, image = unpack_payload(self._read_payload(self._position(key)), where)
    if not image:
      raise BadRecordError(f"{where}: record has no image bytes")
    return _class_id(labels, where), image, where

  def where(self, i: int) -> str:
    """Names image i in messages: file, key and byte offset."""
    return self._where(self._image_key(int(i)))

  def read(self, i: int) -> tuple[int, bytes]:
    """Image i -> (class id, encoded image bytes), without decoding."""
    label, image, _ = self._read_image(self._image_key(int(i)))
    return label, image

  def __getitem__(self, i: int) -> dict[str, Any]:
    label, image, where = self._read_image(self._image_key(int(i)))
    return {"image": decode_image(image, where), "label": label}

  def label(self, i: int) -> int:
    """Class id of image i, reading only the record's first bytes."""
    key = self._image_key(int(i))
    where = self._where(key)
    head = self._read_payload(self._position(key), limit=_IR_HEADER.size + 4)
    if len(head) < _IR_HEADER.size:
      raise BadRecordError(f"{where}: payload of {len(head)} bytes is shorter than the "
                           f"{_IR_HEADER.size}-byte IRHeader")
    flag, label, _, _ = _IR_HEADER.unpack_from(head)
    if flag > 0:
      if len(head) < _IR_HEADER.size + 4:
        raise BadRecordError(f"{where}: label flag {flag} announces float32 labels but the "
                             "payload ends after the IRHeader")
      label, = struct.unpack_from("<f", head, _IR_HEADER.size)
    return _class_id(np.array([label], np.float32), where)

  def labels(self) -> np.ndarray:
    """int64 (len,) class id of every image; one pass over record headers, cached."""
    if self._labels is None:
      self._labels = np.fromiter((self.label(i) for i in range(len(self))), np.int64, len(self))
    return self._labels

  @property
  def num_classes(self) -> int:
    if self._num_classes is None:
      labels = self.labels()
      self._num_classes = int(labels.max()) + 1 if len(labels) else 0
    return self._num_classes

  @property
  def identity_ranges(self) -> np.ndarray:
    """int64 (num_classes, 2): identity c owns images [start, end).

    From the insightface identity records when present (keys converted to image
    indices); otherwise from the labels, which must then be grouped by identity.
    """
    if self._ranges is None:
      self._ranges = (self._ranges_from_identity_records() if self._identity_keys
                      else self._ranges_from_labels())
    return self._ranges

  def _ranges_from_identity_records(self) -> np.ndarray:
    a, b = self._identity_keys
    ranges = np.empty((b - a, 2), np.int64)
    for c, key in enumerate(range(a, b)):
      where = self._where(key)
      flag, labels, image = unpack_payload(self._read_payload(self._position(key)), where)
      if flag != 2 or image:
        raise ValueError(f"{where}: identity record {c} must have label flag 2 and no image "
                         f"(got flag {flag}, {len(image)} image bytes)")
      start = _record_number(float(labels[0]), "identity start key", where)
      end = _record_number(float(labels[1]), "identity end key", where)
      if not 1 <= start <= end <= a:
        raise ValueError(f"{where}: identity {c} range [{start}, {end}) is not inside the "
                         f"image keys [1, {a})")
      ranges[c] = (start - 1, end - 1)
    return ranges

  def _ranges_from_labels(self) -> np.ndarray:
    labels = self.labels()
    ranges = np.zeros((self.num_classes, 2), np.int64)
    change = np.flatnonzero(np.diff(labels)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(labels)]])
    run_labels = labels[starts]
    if len(np.unique(run_labels)) != len(run_labels):
      raise ValueError(f"{self.rec_path}: images of one identity are not contiguous, so "
                       "there are no identity ranges; group by `labels()` instead")
    ranges[run_labels, 0], ranges[run_labels, 1] = starts, ends
    return ranges


# --- writer ------------------------------------------------------------------

def _write_record(f, payload: bytes) -> None:
  """Appends one record at f's (4-aligned) position, splitting it where the magic word
  sits at an aligned payload offset (cflag 1/2/3), as dmlc's RecordIOWriter does."""
  n = len(payload)
  if n > _LENGTH_MASK:
    raise ValueError(f"RecordIO: a record holds at most {_LENGTH_MASK} bytes, got {n}")
  words = np.frombuffer(payload, "<u4", n // 4)
  cuts = (np.flatnonzero(words == MAGIC) * 4).tolist()
  pos = 0
  for cut in cuts:
    f.write(_CHUNK.pack(MAGIC, (1 if pos == 0 else 2) << _LENGTH_BITS | (cut - pos)))
    f.write(payload[pos:cut])  # cut - pos is a multiple of 4: no padding
    pos = cut + 4
  f.write(_CHUNK.pack(MAGIC, (3 if cuts else 0) << _LENGTH_BITS | (n - pos)))
  f.write(payload[pos:])
  f.write(b"\0" * (-(n - pos) % 4))


def pack_payload(label: Union[int, float, Iterable[float]], image: bytes) -> bytes:
  """IRHeader (+ float32 label vector when `label` is a sequence) + image bytes."""
  if np.ndim(label) == 0:
    return _IR_HEADER.pack(0, float(label), 0, 0) + image
  vector = np.asarray(label, "<f4").ravel()
  return _IR_HEADER.pack(len(vector), 0.0, 0, 0) + vector.tobytes() + image


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
  """uint8 (H, W, 3) RGB -> JPEG bytes."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
  out = io.BytesIO()
  Image.fromarray(image).save(out, format="JPEG", quality=quality)
  return out.getvalue()


def write_recordio(prefix: PathLike, examples: Iterable[Mapping[str, Any]], *,
                   insightface_header: bool = True, num_classes: Optional[int] = None,
                   write_property: bool = True, jpeg_quality: int = 95) -> int:
  """Writes `prefix.rec`, `prefix.idx` (and `property` beside them); returns #images.

  Args:
    prefix: output path without extension.
    examples: dicts with "image" (uint8 (H, W, 3) RGB, JPEG-encoded here, or already
      encoded bytes, stored as they are) and "label" (int class id, or a sequence of
      floats stored as a flag>0 label vector). Streamed: a folder of any size packs.
    insightface_header: write the insightface layout: header at key 0, images at
      keys 1..N, one identity record per class after them, and `property`. Needs int
      labels in non-decreasing order. Otherwise keys 0..N-1 are the images.
    num_classes: insightface layout: class count when trailing classes have no images
      (default: largest label + 1).
    write_property: insightface layout: write `property` ("num_classes,H,W") beside the
      pack. It describes the folder's training pack, so turn it off for a second pack
      (e.g. a meta set) in the same folder.
    jpeg_quality: for images given as arrays.
  """
  prefix = os.fspath(prefix)
  rec_path, idx_path = prefix + ".rec", prefix + ".idx"
  ranges = []            # insightface: [start key, end key) per class
  image_shape = None
  with open(rec_path, "wb") as rec, open(idx_path, "w") as idx:
    key = 0
    if insightface_header:  # Reserve key 0; rewritten once A and B are known.
      header_size = _CHUNK.size + _IR_HEADER.size + 8
      rec.write(b"\0" * header_size)
      idx.write("0\t0\n")
      key = 1
    for n, ex in enumerate(examples):
      image, label = ex["image"], ex["label"]
      if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
      else:
        data = encode_jpeg(image, jpeg_quality)
        image_shape = image_shape or np.shape(image)[:2]
      if image_shape is None and insightface_header:  # for `property`
        try:
          with Image.open(io.BytesIO(data)) as img:
            image_shape = (img.height, img.width)
        except (OSError, ValueError, SyntaxError):
          pass  # stored as given; the reader reports it if it stays undecodable
      if insightface_header:
        if np.ndim(label) != 0 or int(label) != label:
          raise ValueError(f"write_recordio: example {n}: the insightface layout needs an int "
                           f"class id, got {label!r}")
        label = int(label)
        if label < len(ranges) - 1 or label < 0:
          raise ValueError(f"write_recordio: example {n} has label {label} after label "
                           f"{len(ranges) - 1}; the insightface layout needs images sorted "
                           "by class id")
        while len(ranges) <= label:  # a class without images gets an empty range
          ranges.append([key, key])
        ranges[label][1] = key + 1
      idx.write(f"{key}\t{rec.tell()}\n")
      _write_record(rec, pack_payload(label, data))
      key += 1
    num_images = key - 1 if insightface_header else key
    if insightface_header:
      if num_classes is not None:
        if num_classes < len(ranges):
          raise ValueError(f"write_recordio: num_classes={num_classes} but labels reach "
                           f"{len(ranges) - 1}")
        ranges += [[key, key] for _ in range(num_classes - len(ranges))]
      a, b = key, key + len(ranges)
      if b >= _FLOAT32_EXACT:
        raise ValueError(f"write_recordio: {b} keys exceed the float32-exact record numbers "
                         f"(< {_FLOAT32_EXACT}) of the insightface header; split the pack")
      for start, end in ranges:
        idx.write(f"{key}\t{rec.tell()}\n")
        _write_record(rec, pack_payload([start, end], b""))
        key += 1
      rec.seek(0)
      _write_record(rec, pack_payload([a, b], b""))
      assert rec.tell() == header_size, "header record changed size"
  if insightface_header and write_property:
    height, width = image_shape or (0, 0)
    with open(os.path.join(os.path.dirname(os.path.abspath(rec_path)), "property"), "w") as f:
      f.write(f"{len(ranges)},{height},{width}")
  return num_images
