"""Image-caption pairs with image ids: the training sources of retrieval fine-tuning.

One record per (image, caption), as the official `re_train_dataset`; `image_id` names
the image so the ITC targets can treat every caption of the same image as a positive
and ITM never draws a caption of the same image as a negative.

  src = ShapesPairs(data_cfg, num_images=2000)          # images 0..1999 of shapes train
  src = CaptionPairs(["coco_train.json"], image_root)   # ALBEF retrieval train JSON
  ex = src[r]   # {"image": (H, W, 3) uint8, "captions": [str], "index": r, "image_id": int}

Caption JSON records are `{"image": path, "caption": str, "image_id": str | int}`;
image ids are mapped to 0, 1, ... in order of first appearance (as the official
dataset does). A record without `image_id` is an error naming the file and record.
"""

import json
from typing import Any, Sequence

from simla_jax.data import captions as captions_lib
from simla_jax.data import shapes


class ShapesPairs:
  """The first `num_images` shapes-world train images, one record per caption."""

  def __init__(self, data_cfg: Any, num_images: int, split: str = "train"):
    self.source = shapes.ShapesSource(data_cfg, split)
    if not 0 < num_images <= len(self.source):
      raise ValueError(f"retrieval pairs: num_images {num_images} must be in "
                       f"[1, {len(self.source)}] (shapes {split}_size)")
    self.num_images = int(num_images)
    self.per_image = self.source.captions_per_image

  def __len__(self) -> int:
    return self.num_images * self.per_image

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"retrieval pairs: index {index} out of range [0, {len(self)})")
    image_id, k = divmod(index, self.per_image)
    ex = self.source[image_id]
    return {"image": ex["image"], "captions": [ex["captions"][k]], "index": index,
            "image_id": image_id}


class CaptionPairs:
  """ALBEF retrieval-train JSON files: one (image, caption, image_id) record each."""

  def __init__(self, files: Sequence[str] | str, image_root: str = ""):
    self.source = captions_lib.CaptionJsonSource(files, image_root)
    ids, self.image_ids = {}, []
    offset = 0
    for path in self.source.files:
      with open(path, encoding="utf-8") as f:
        raw = json.load(f)   # already validated by CaptionJsonSource
      for k, r in enumerate(raw):
        if "image_id" not in r:
          raise ValueError(f"retrieval pairs: {path} record {k} has no 'image_id'")
        if len(self.source.records[offset + k]["captions"]) != 1:
          raise ValueError(f"retrieval pairs: {path} record {k}: a training record holds one "
                           f"caption (a list is the eval format)")
        self.image_ids.append(ids.setdefault(str(r["image_id"]), len(ids)))
      offset += len(raw)
    self.num_images = len(ids)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = self.source[index]
    return {**ex, "image_id": self.image_ids[int(index)]}
