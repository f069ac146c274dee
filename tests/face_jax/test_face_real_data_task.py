"""The face task on a tiny insightface pack: variations and meta batch added to the
pipeline's batches, iterator state, steps, and .bin evaluation with groups."""

import jax
import numpy as np
import optax
import pytest

from configs import mvcom as mvcom_config
from face_jax import train
from face_jax.data import recordio, verification

SIZE, CLASSES = 16, 6


def _pack(tmp_path):
  rng = np.random.default_rng(0)
  faces = rng.integers(0, 256, size=(CLASSES, SIZE, SIZE, 3))

  def image(c):
    noise = rng.integers(-20, 21, size=(SIZE, SIZE, 3))
    return np.clip(faces[c] + noise, 0, 255).astype(np.uint8)

  train_ex = [{"image": image(c), "label": c} for c in range(CLASSES) for _ in range(2 + c)]
  recordio.write_recordio(tmp_path / "train", train_ex)
  recordio.write_recordio(tmp_path / "meta", [{"image": image(c), "label": c}
                                              for c in range(CLASSES) for _ in range(2)],
                          write_property=False, num_classes=CLASSES)
  for name, classes in (("grp_a", (0, 1, 2)), ("grp_b", (3, 4, 5))):
    images, issame = [], []
    for k in range(10):
      a = classes[k % 3]
      b = a if k % 2 == 0 else classes[(k + 1) % 3]
      images += [image(a), image(b)]
      issame.append(a == b)
    verification.write_bin(tmp_path / f"{name}.bin", images, issame)
  np.save(tmp_path / "groups.npy", np.array([0, 0, 0, 1, 1, 1]))


def _config(tmp_path, arg):
  c = mvcom_config.get_config(arg)
  c.batch_size = 8
  c.model.update(layers=(1,), widths=(4,), embed_dim=8)   # stem + one stride-2 block + head
  c.data.update(name="real", image_size=SIZE, rec_prefix=str(tmp_path / "train"),
                meta_rec_prefix=str(tmp_path / "meta"), group_of_class=str(tmp_path / "groups.npy"),
                val_bins=(str(tmp_path / "grp_a.bin"), str(tmp_path / "grp_b.bin")),
                group_bins=("grp_a", "grp_b"), meta_batch_size=4, read_threads=1,
                prefetch_batches=2, train_variation_rate=0.5)
  c.mvcom.factors = (("group", 2), ("pose", 1), ("occlusion", 1), ("blur", 1))
  c.eval.update(batch_size=8, n_folds=2)
  return c


def test_real_data_task(tmp_path):
  _pack(tmp_path)
  config = _config(tmp_path, "l2rw")   # a method with a meta batch (and a cheap compile)
  tx = optax.sgd(0.05, momentum=0.9)
  task = train.make_task_with(config, tx, optax.constant_schedule(0.05))
  batch = next(task.train_data)
  assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["meta_image"].shape == (4, SIZE, SIZE, 3)
  assert set(batch) >= {"label", "group", "pose", "occlusion", "blur", "class_prior",
                        "meta_label", "meta_group", "meta_pose"}
  np.testing.assert_array_equal(batch["group"], (batch["label"] >= 3).astype(np.int32))
  assert 0 < batch["pose"].mean() + batch["blur"].mean() + batch["occlusion"].mean()
  # Iterator state: replaying from a saved state reproduces the next batch exactly.
  state = task.train_data.get_state()
  want = next(task.train_data)
  task.train_data.set_state(state)
  got = next(task.train_data)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  assert task.host_metrics()["data_bad_records"] == 0
  import flax.linen as nn
  state = jax.jit(lambda r: nn.meta.unbox(task.init(r)))(jax.random.key(0))
  step = jax.jit(task.train_step)
  state, m = step(state, next(task.train_data))
  assert np.isfinite(float(m["loss"])) and 0 < float(m["weight_max"]) <= 1
  scores = task.evaluate(state)
  assert {"acc_grp_a", "acc_grp_b", "acc_worst_group", "group_gap"} <= set(scores)
  task.finish(state, str(tmp_path))
  assert (tmp_path / "roc_bins.png").stat().st_size > 0


def test_real_data_config_errors(tmp_path):
  _pack(tmp_path)
  config = _config(tmp_path, "")
  config.data.meta_rec_prefix = ""
  with pytest.raises(ValueError, match="meta_rec_prefix"):
    train.make_task_with(config, optax.sgd(0.1), optax.constant_schedule(0.1))
  config = _config(tmp_path, "")
  config.data.group_of_class = ""
  with pytest.raises(ValueError, match="group_of_class"):
    train.make_task_with(config, optax.sgd(0.1), optax.constant_schedule(0.1))
  config = _config(tmp_path, "")
  np.save(tmp_path / "bad.npy", np.zeros(3))
  config.data.group_of_class = str(tmp_path / "bad.npy")
  with pytest.raises(ValueError, match="one per"):
    train.make_task_with(config, optax.sgd(0.1), optax.constant_schedule(0.1))
