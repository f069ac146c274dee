"""Folders of aligned face crops, `root/<identity>/<image>`, as a grain source.

Identity ids are the positions of the identity folder names in sorted order, so they
depend only on the names (adding an image never renumbers; adding an identity shifts
only the ones after it). Images within an identity are in sorted file-name order.
Hidden entries (".name") are ignored; an identity folder without images keeps its id.
"""

import logging
import os
from typing import Any, Iterator, Sequence, Union

import numpy as np

from face_jax.data.recordio import BadRecordError, decode_image

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _visible(entries: Sequence[os.DirEntry]) -> list[os.DirEntry]:
  return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


class ImageFolder:
  """Random access to `root/<identity>/<image>`.

  `ds[i]` -> {"image": uint8 (H, W, 3) RGB, "label": int}. Images of one identity
  are contiguous, so `identity_ranges` is exact.

  Attributes:
    root: the folder.
    identity_names: sorted identity folder names; label c is identity_names[c].
    num_classes: len(identity_names).
    identity_ranges: int64 (num_classes, 2), [start, end) image indices per identity.
    labels: int64 (len,) class id per image.
  """

  def __init__(self, root: PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS):
    self.root = os.fspath(root)
    if not os.path.isdir(self.root):
      raise FileNotFoundError(f"ImageFolder: {self.root} is not a directory")
    extensions = tuple(e.lower() for e in extensions)
    with os.scandir(self.root) as it:
      entries = _visible(list(it))
    identities = [e for e in entries if e.is_dir()]
    stray = [e.name for e in entries if not e.is_dir()]
    if stray:
      log.warning("ImageFolder %s: ignoring %d files outside identity folders (e.g. %s)",
                  self.root, len(stray), stray[0])
    if not identities:
      raise ValueError(f"ImageFolder: {self.root} has no identity folders "
                       "(expected root/<identity>/<image>)")
    self.identity_names = [e.name for e in identities]
    self._paths: list[str] = []
    ranges = []
    empty = []
    for ident in identities:
      start = len(self._paths)
      with os.scandir(ident.path) as it:
        files = [e for e in _visible(list(it))
                 if e.is_file() and os.path.splitext(e.name)[1].lower() in extensions]
      self._paths.extend(os.path.join(ident.name, e.name) for e in files)
      ranges.append((start, len(self._paths)))
      if not files:
        empty.append(ident.name)
    if empty:
      log.warning("ImageFolder %s: %d identity folders hold no images (e.g. %s); they keep "
                  "their label ids", self.root, len(empty), empty[0])
    if not self._paths:
      raise ValueError(f"ImageFolder: no images with extensions {extensions} under {self.root}")
    self.identity_ranges = np.asarray(ranges, np.int64).reshape(-1, 2)
    self.labels = np.repeat(np.arange(len(ranges)), np.diff(self.identity_ranges, axis=1)[:, 0])

  @property
  def num_classes(self) -> int:
    return len(self.identity_names)

  def __len__(self) -> int:
    return len(self._paths)

  def path(self, i: int) -> str:
    return os.path.join(self.root, self._paths[i])

  def where(self, i: int) -> str:
    """Names image i in messages: its path."""
    return self.path(i)

  def read(self, i: int) -> tuple[int, bytes]:
    """Image i -> (class id, the file's bytes), without decoding."""
    i = int(i)
    if not -len(self) <= i < len(self):
      raise IndexError(f"{self.root}: image index {i} out of range [0, {len(self)})")
    path = self.path(i)
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError as e:
      raise BadRecordError(f"{path}: cannot read ({e})") from None
    return int(self.labels[i]), data

  def __getitem__(self, i: int) -> dict[str, Any]:
    label, data = self.read(i)
    return {"image": decode_image(data, self.path(int(i))), "label": label}

  def encoded_examples(self) -> Iterator[dict[str, Any]]:
    """{"image": file bytes, "label": int} in order: feed `write_recordio` to pack the
    folder without re-encoding (labels come sorted, as the insightface layout needs)."""
    for i in range(len(self)):
      label, data = self.read(i)
      yield {"image": data, "label": label}
