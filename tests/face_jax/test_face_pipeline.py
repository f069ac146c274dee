"""grain pipeline over RecordIO: normalisation, flip, sharding, shuffling, state, bad records."""

import io
import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from face_jax.data import pipeline
from face_jax.data.recordio import RecordIO, write_recordio
from face_jax.data.verification import write_bin

SIZE = 16


def _image(i: int) -> np.ndarray:
  """Left and right halves differ, so a flip is visible."""
  img = np.zeros((SIZE, SIZE, 3), np.uint8)
  img[:, :SIZE // 2] = (20 + 9 * i, 200, 40)
  img[:, SIZE // 2:] = (230 - 9 * i, 30, 160)
  return img


def _png(img: np.ndarray) -> bytes:  # lossless, so expected values are exact
  out = io.BytesIO()
  Image.fromarray(img).save(out, format="PNG")
  return out.getvalue()


@pytest.fixture
def pack(tmp_path):
  """20 records, label = record index (one identity each)."""
  write_recordio(tmp_path / "train", [{"image": _png(_image(i)), "label": i} for i in range(20)])
  return RecordIO(tmp_path / "train")


def _bad_pack(tmp_path):
  examples = [{"image": _png(_image(i)), "label": i} for i in range(20)]
  examples[3]["image"] = b"\xff\xd8\xff corrupt"
  examples[11]["image"] = _png(np.zeros((8, 8, 3), np.uint8))      # wrong size
  examples[17]["image"] = _png(_image(17))[:50]                    # truncated
  write_recordio(tmp_path / "bad", examples)
  return RecordIO(tmp_path / "bad")


def _dataset(source, **kw):
  args = dict(batch_size=4, seed=0, image_size=(SIZE, SIZE), read_threads=2,
              prefetch_batches=4)
  args.update(kw)
  return pipeline.train_dataset(source, **args)


def _epoch_labels(ds):
  return np.concatenate([b["label"] for b in ds])


def test_batches_are_normalised_images_in_order(pack):
  batches = list(_dataset(pack, shuffle=False, flip=False, num_epochs=1))
  assert len(batches) == 5
  b = batches[1]
  assert b["image"].shape == (4, SIZE, SIZE, 3) and b["image"].dtype == np.float32
  assert b["label"].dtype == np.int32 and b["label"].tolist() == [4, 5, 6, 7]
  expected = np.stack([(_image(i) / 255.0 - 0.5) / 0.5 for i in range(4, 8)])
  np.testing.assert_allclose(b["image"], expected, atol=1e-6)


def test_random_flip_is_horizontal_and_about_half(pack):
  batches = list(_dataset(pack, shuffle=False, flip=True, num_epochs=3, seed=3))
  flipped = []
  for b in batches:
    for img, label in zip(b["image"], b["label"]):
      plain = pipeline.normalize(_image(label))
      if np.array_equal(img, plain):
        flipped.append(False)
      else:
        np.testing.assert_array_equal(img, plain[:, ::-1])
        flipped.append(True)
  assert 0.25 < np.mean(flipped) < 0.75


def test_shards_partition_an_epoch_and_epochs_reshuffle(pack):
  shards = [_epoch_labels(_dataset(pack, shard_index=k, shard_count=2, num_epochs=1,
                                   batch_size=2)) for k in range(2)]
  assert len(shards[0]) == len(shards[1]) == 10
  assert sorted(np.concatenate(shards).tolist()) == list(range(20))
  two = _epoch_labels(_dataset(pack, num_epochs=2, batch_size=5))
  assert sorted(two[:20].tolist()) == sorted(two[20:].tolist()) == list(range(20))
  assert two[:20].tolist() != two[20:].tolist() and two[:20].tolist() != list(range(20))
  again = _epoch_labels(_dataset(pack, num_epochs=2, batch_size=5))
  other = _epoch_labels(_dataset(pack, num_epochs=2, batch_size=5, seed=1))
  assert again.tolist() == two.tolist() and other.tolist() != two.tolist()


@pytest.mark.parametrize("shuffle,steps", [(False, 1), (True, 3)])
def test_state_round_trip_through_json(tmp_path, shuffle, steps):
  source = _bad_pack(tmp_path)
  ds = _dataset(source, max_bad_fraction=0.5, shuffle=shuffle)
  it = iter(ds)
  for _ in range(steps):
    next(it)
  state = json.loads(json.dumps(it.get_state()))   # as grain's checkpoint handler stores it
  if not shuffle:  # record 3 is bad: batch 0 took 3 of chunk 0 and 1 of chunk 1
    assert state["chunk_pos"] == 1 and state["seen_records"] == 8
  ahead = [next(it) for _ in range(6)]
  resumed = iter(ds)
  resumed.set_state(state)
  assert resumed.seen_records == state["seen_records"]
  for a, b in zip(ahead, (next(resumed) for _ in range(6))):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert (resumed.bad_records, resumed.seen_records) == (it.bad_records, it.seen_records)


def test_hflip_matches_reversed_view():
  x = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
  np.testing.assert_array_equal(pipeline.hflip(x), x[:, ::-1])
  y = x[1:4, 2:6].astype(np.float32)                       # non-contiguous source, floats
  np.testing.assert_array_equal(pipeline.hflip(y), y[:, ::-1])
  assert pipeline.hflip(x).flags.c_contiguous


def test_bad_records_are_skipped_counted_and_named(tmp_path):
  source = _bad_pack(tmp_path)
  it = iter(_dataset(source, shuffle=False, flip=False, num_epochs=1, batch_size=17,
                     drop_remainder=False, max_bad_fraction=0.2))
  labels = np.concatenate([b["label"] for b in it])
  assert sorted(labels.tolist()) == sorted(set(range(20)) - {3, 11, 17})
  assert it.bad_records == 3 and it.seen_records == 20
  assert it.host_metrics() == {"data_bad_records": 3.0, "data_seen_records": 20.0}
  assert "bad.rec: record key 18 at offset" in it.last_bad                # label 17 = key 18


def test_too_many_bad_records_stop_naming_the_last_one(tmp_path):
  source = _bad_pack(tmp_path)
  # 0.05 * 20 records per epoch allows 1 bad record; the second stops the run.
  it = iter(_dataset(source, shuffle=False, flip=False, max_bad_fraction=0.05))
  with pytest.raises(pipeline.TooManyBadRecordsError,
                     match=r"2 bad records out of 12 read exceed max_bad_fraction=0\.05 .*last "
                     r"bad record: .*bad\.rec: record key 12 at offset \d+: "
                     r"image has shape \(8, 8, 3\)"):
    for _ in range(5):
      next(it)


def test_worker_process_gives_the_same_stream(pack):
  base = _epoch_labels(_dataset(pack, num_epochs=1))
  ds = _dataset(pack, num_epochs=1, worker_count=1)
  it = iter(ds)
  try:
    assert np.concatenate([b["label"] for b in it]).tolist() == base.tolist()
  finally:
    it.close()


def test_train_iterator_and_val_bins_from_config(tmp_path, pack):
  write_bin(tmp_path / "lfw.bin", [_image(i) for i in range(4)], [True, False])
  config = ml_collections.ConfigDict(dict(batch_size=8, seed=0, data=pipeline.data_config()))
  config.data.rec_prefix = str(tmp_path / "train")
  config.data.image_size = (SIZE, SIZE)
  config.data.read_threads = 2
  config.data.val_bins = (str(tmp_path / "lfw.bin"),)
  it = pipeline.train_iterator(config)
  batch = next(it)
  assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["label"].shape == (8,)
  assert it.host_metrics()["data_seen_records"] == 8.0
  bins = pipeline.load_val_bins(config.data)
  assert list(bins) == ["lfw"] and bins["lfw"][0].shape == (4, SIZE, SIZE, 3)
  config.data.rec_prefix = ""
  with pytest.raises(ValueError, match="rec_prefix .* or image_root"):
    pipeline.make_source(config.data)
  # A family config with only some keys (an int image size) gets the other defaults.
  sparse = ml_collections.ConfigDict(dict(batch_size=4, seed=1, data=dict(
      rec_prefix=str(tmp_path / "train"), image_size=SIZE, read_threads=1)))
  assert next(pipeline.train_iterator(sparse))["image"].shape == (4, SIZE, SIZE, 3)


def test_orbax_checkpoint_of_the_iterator(tmp_path):
  """The loop's Checkpointer saves and restores the iterator through grain's handler."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from train_jax.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  source = _bad_pack(tmp_path)
  ds = _dataset(source, max_bad_fraction=0.5)
  it = iter(ds)
  for _ in range(2):
    next(it)
  ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=1)
  ckpt.save(1, {"w": jnp.zeros(3)}, it)
  ckpt.close()
  ahead = [next(it)["label"].tolist() for _ in range(4)]
  resumed = iter(ds)
  ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=1)
  assert ckpt.restore_latest({"w": jnp.zeros(3)}, resumed)[0] == 1
  ckpt.close()
  assert [next(resumed)["label"].tolist() for _ in range(4)] == ahead
  assert (resumed.bad_records, resumed.seen_records) == (it.bad_records, it.seen_records)
