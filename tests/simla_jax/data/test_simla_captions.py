"""Caption JSON source: concatenation, decoding, and errors that name the file."""

import json

import numpy as np
import pytest
from PIL import Image

from simla_jax.data import default_data_config, pipeline
from simla_jax.data.captions import BadImageError, CaptionJsonSource


def _write_images(root, n, size=(40, 30)):
  rng = np.random.default_rng(0)
  for i in range(n):
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
        root / f"img{i}.jpg" if i % 2 else root / f"img{i}.png")


def _name(i):
  return f"img{i}.jpg" if i % 2 else f"img{i}.png"


def test_files_concatenate_and_decode(tmp_path):
  _write_images(tmp_path, 3)
  (tmp_path / "a.json").write_text(json.dumps([
      {"image": _name(0), "caption": "A dog."},
      {"image": _name(1), "caption": ["one", "two"], "image_id": 7}]))
  (tmp_path / "b.json").write_text(json.dumps([{"image": _name(2), "caption": "three"}]))
  src = CaptionJsonSource([str(tmp_path / "a.json"), str(tmp_path / "b.json")], str(tmp_path))
  assert len(src) == 3
  assert [src[i]["captions"] for i in range(3)] == [["A dog."], ["one", "two"], ["three"]]
  ex = src[1]
  assert ex["image"].shape == (30, 40, 3) and ex["image"].dtype == np.uint8 and ex["index"] == 1


def test_malformed_json_names_file_and_position(tmp_path):
  path = tmp_path / "broken.json"
  path.write_text('[{"image": "a.jpg", "caption": "x"},\n {"image": "b.jpg" "caption": "y"}]')
  with pytest.raises(ValueError, match=r"broken.json.*line 2 column 20"):
    CaptionJsonSource([str(path)])
  with pytest.raises(FileNotFoundError, match="absent.json"):
    CaptionJsonSource([str(tmp_path / "absent.json")])
  path.write_text(json.dumps([{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg"}]))
  with pytest.raises(ValueError, match="broken.json record 1.*caption"):
    CaptionJsonSource([str(path)])
  path.write_text(json.dumps({"image": "a.jpg"}))
  with pytest.raises(ValueError, match="broken.json must hold a JSON list"):
    CaptionJsonSource([str(path)])


def test_missing_and_corrupt_images_name_the_file(tmp_path):
  _write_images(tmp_path, 1)
  (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
  good = (tmp_path / "img0.png").read_bytes()
  (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
  ann = tmp_path / "ann.json"
  ann.write_text(json.dumps([{"image": "missing.jpg", "caption": "a"},
                             {"image": "corrupt.jpg", "caption": "b"},
                             {"image": "truncated.png", "caption": "c"}]))
  src = CaptionJsonSource(str(ann), str(tmp_path))
  with pytest.raises(BadImageError, match=r"missing.jpg does not exist \(.*ann.json record 0\)"):
    src[0]
  with pytest.raises(BadImageError, match=r"cannot decode image .*corrupt.jpg.*ann.json record 1"):
    src[1]
  with pytest.raises(BadImageError, match="truncated.png"):
    src[2]


def _captions_cfg(tmp_path, records, skip_bad, max_bad_fraction=0.5):
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "cat"]))
  ann = tmp_path / "train.json"
  ann.write_text(json.dumps(records))
  cfg = default_data_config()
  cfg.name = "captions"
  cfg.captions.update(train_files=(str(ann),), eval_files=(str(ann),),
                      image_root=str(tmp_path), skip_bad=skip_bad,
                      max_bad_fraction=max_bad_fraction)
  cfg.tokenizer.vocab_file = str(vocab)
  cfg.image_size = 32
  cfg.mim.update(patch_size=16, num_masking_patches=2, min_num_patches=1)
  cfg.loader.num_epochs = 1
  cfg.loader.drop_remainder = False
  return cfg


def test_pipeline_skips_and_counts_bad_examples_or_fails(tmp_path, caplog):
  _write_images(tmp_path, 4)
  records = [{"image": _name(i), "caption": ["a dog", "a cat"]} for i in range(4)]
  records.insert(2, {"image": "gone.jpg", "caption": "a dog"})
  cfg = _captions_cfg(tmp_path, records, skip_bad=True)
  ds = pipeline.make_train_dataset(cfg, batch_size=2, process_index=0, process_count=1)
  batches = list(ds)
  indices = sorted(int(i) for b in batches for i in b["index"])
  assert indices == [0, 1, 3, 4]  # record 2 skipped
  assert "skipping bad example 2 (1 so far)" in caplog.text and "gone.jpg" in caplog.text
  assert batches[0]["image"].shape == (2, 32, 32, 3) and batches[0]["text_ids"].shape == (2, 30)
  cfg = _captions_cfg(tmp_path, records, skip_bad=False)
  with pytest.raises(BadImageError, match="gone.jpg"):
    list(pipeline.make_train_dataset(cfg, batch_size=2, process_index=0, process_count=1))
  ev = pipeline.make_eval_data(cfg)  # captions are read without decoding images
  assert ev.num_images == 5 and ev.num_texts == 9
  assert ev.captions[:2] == ["a dog", "a cat"]


def test_bad_examples_beyond_the_budget_stop_the_pipeline(tmp_path):
  _write_images(tmp_path, 4)
  records = [{"image": _name(i), "caption": "a dog"} for i in range(4)]
  records += [{"image": f"gone{i}.jpg", "caption": "a cat"} for i in range(4)]
  cfg = _captions_cfg(tmp_path, records, skip_bad=True, max_bad_fraction=0.25)
  cfg.loader.num_epochs = -1
  # 8 per epoch: the third bad example exceeds 0.25 * 8.
  with pytest.raises(pipeline.TooManyBadExamplesError,
                     match=r"3 bad examples of \d+ read exceed max_bad_fraction=0.25.*gone"):
    it = iter(pipeline.make_train_dataset(cfg, batch_size=2, process_index=0, process_count=1))
    for _ in range(100):
      next(it)


def test_an_all_bad_caption_set_stops_instead_of_skipping_forever(tmp_path):
  # The user report: a wrong image root, skip_bad=True, an endless stream of skips.
  records = [{"image": f"img{i}.jpg", "caption": "a dog"} for i in range(6)]
  cfg = _captions_cfg(tmp_path, records, skip_bad=True, max_bad_fraction=0.01)
  cfg.loader.num_epochs = -1
  with pytest.raises(pipeline.TooManyBadExamplesError, match="max_bad_fraction=0.01"):
    next(iter(pipeline.make_train_dataset(cfg, batch_size=2, process_index=0, process_count=1)))
  # Even with every example allowed to be bad, an epoch with nothing good is an error.
  cfg.captions.max_bad_fraction = 1.0
  ds = pipeline.make_train_dataset(cfg, batch_size=2, process_index=1, process_count=2)
  with pytest.raises(pipeline.TooManyBadExamplesError,
                     match=r"a whole epoch \(3 examples in this process's shard\) yielded no "
                           r"usable example.*image_root"):
    next(iter(ds))
