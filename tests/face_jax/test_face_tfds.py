"""TFDS array_record builds of face data (.rec with attributes, image folders, .bin packs,
synthetic faces): read back they equal the direct readers; bad records are counted."""

import io
import json
import logging
import pickle

import ml_collections
import numpy as np
import pytest
from PIL import Image

from face_jax.data import pipeline, tfds_builders
from face_jax.data.folders import ImageFolder
from face_jax.data.recordio import RecordIO, write_recordio
from face_jax.data.verification import load_bin, write_bin
from train_jax import tfds_build

SIZE = 16
NUM_IDS = 5


def _image(i: int) -> np.ndarray:
  rng = np.random.default_rng(i)
  return rng.integers(0, 255, (SIZE, SIZE, 3), np.uint8)


def _jpeg(img: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(img).save(out, format="JPEG", quality=90)
  return out.getvalue()


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
  """An insightface pack (5 identities, 3-5 images each), per-image attribute columns, a
  per-identity group file, a held-out meta pack; built into one face_recordio dataset."""
  root = tmp_path_factory.mktemp("rec")
  labels = np.repeat(np.arange(NUM_IDS), [3, 5, 4, 3, 5])
  write_recordio(root / "train", [{"image": _jpeg(_image(i)), "label": int(y)}
                                  for i, y in enumerate(labels)])
  write_recordio(root / "meta", [{"image": _jpeg(_image(100 + i)), "label": int(y)}
                                 for i, y in enumerate(labels[::2])], write_property=False)
  pose = (np.arange(len(labels)) % 3 == 0).astype(np.int32)
  quality = np.linspace(0, 1, len(labels)).astype(np.float32)
  np.savez(root / "attrs.npz", pose=pose, quality=quality)
  np.savez(root / "meta_attrs.npz", pose=pose[::2], quality=quality[::2])
  groups = np.array([0, 0, 1, 2, 1])
  np.save(root / "groups.npy", groups)
  out = str(root / "tfds")
  config = tfds_builders.make_config(
      "face_recordio", "tiny",
      {"train": [str(root / "train"), str(root / "attrs.npz")],
       "meta": [str(root / "meta"), str(root / "meta_attrs.npz")]},
      options={"group_of_class": str(root / "groups.npy")})
  summary = tfds_builders.build("face_recordio", config, out)
  return dict(root=root, out=out, labels=labels, pose=pose, quality=quality, groups=groups,
              summary=summary)


def _dataset(source, **kw):
  args = dict(batch_size=4, seed=3, image_size=(SIZE, SIZE), read_threads=2,
              prefetch_batches=2)
  args.update(kw)
  return pipeline.train_dataset(source, **args)


def _assert_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_recordio_build_holds_bytes_labels_groups_and_attributes(rec):
  assert {k: v["examples"] for k, v in rec["summary"]["splits"].items()} == {"train": 20,
                                                                             "meta": 10}
  pack = RecordIO(rec["root"] / "train")
  split = tfds_build.open_split(rec["out"], "face_recordio/tiny", "train")
  for i in range(len(pack)):
    row = split.source[i]
    assert (int(row["label"]), row["image"]) == pack.read(i)
    assert int(row["group"]) == rec["groups"][rec["labels"][i]]
    assert int(row["pose"]) == rec["pose"][i]
    assert np.float32(row["quality"]) == rec["quality"][i]
  source = tfds_builders.TfdsFaceSource(rec["out"], "face_recordio/tiny")
  assert source.num_classes == pack.num_classes == NUM_IDS
  np.testing.assert_array_equal(source.identity_ranges, pack.identity_ranges)
  np.testing.assert_array_equal(source.group_of_class, rec["groups"])
  np.testing.assert_array_equal(source.labels(), pack.labels())
  copy = pickle.loads(pickle.dumps(source))  # what grain worker processes receive
  assert copy.read(7) == pack.read(7)


def test_recordio_batches_equal_the_direct_reader_and_resume_exactly(rec):
  pack = RecordIO(rec["root"] / "train")
  built = tfds_builders.TfdsFaceSource(rec["out"], "face_recordio/tiny")
  direct_it, built_it = iter(_dataset(pack)), iter(_dataset(built))
  for _ in range(7):  # 5 batches per epoch: into the second, reshuffled epoch
    _assert_equal(next(built_it), next(direct_it))
  state = json.loads(json.dumps(built_it.get_state()))
  expected = [next(built_it) for _ in range(4)]
  resumed = iter(_dataset(built))
  resumed.set_state(state)
  for want in expected:
    _assert_equal(next(resumed), want)


def test_config_source_switch_reads_train_meta_and_val_packs(rec, tmp_path):
  images = np.stack([_image(200 + i) for i in range(8)])
  write_bin(tmp_path / "lfw.bin", images, [True, False, True, False])
  write_bin(tmp_path / "cfp_fp.bin", images[:4], [False, True])
  val = tfds_builders.make_config("face_verification", "packs",
                                  {"lfw": [str(tmp_path / "lfw.bin")],
                                   "cfp_fp": [str(tmp_path / "cfp_fp.bin")]})
  tfds_builders.build("face_verification", val, rec["out"])
  data = ml_collections.ConfigDict(dict(
      source="tfds", tfds_dir=rec["out"], tfds_name="face_recordio/tiny", tfds_split="meta",
      tfds_val_name="face_verification/packs", image_size=SIZE))
  source = pipeline.make_source(data)
  assert len(source) == 10 and source.split.name == "meta"
  packs = pipeline.load_val_bins(data)
  for name in ("lfw", "cfp_fp"):
    want = load_bin(tmp_path / f"{name}.bin", image_size=(SIZE, SIZE))
    np.testing.assert_array_equal(packs[name][0], want[0])
    np.testing.assert_array_equal(packs[name][1], want[1])


def test_image_folder_build_equals_the_folder(tmp_path):
  for i in range(7):
    (tmp_path / "faces" / f"id{i % 3}").mkdir(parents=True, exist_ok=True)
    (tmp_path / "faces" / f"id{i % 3}" / f"{i}.jpg").write_bytes(_jpeg(_image(i)))
  config = tfds_builders.make_config("face_folder", "f", {"train": [str(tmp_path / "faces")]})
  tfds_builders.build("face_folder", config, str(tmp_path / "out"))
  folder = ImageFolder(tmp_path / "faces")
  built = tfds_builders.TfdsFaceSource(str(tmp_path / "out"), "face_folder/f")
  assert len(built) == len(folder) == 7
  np.testing.assert_array_equal(built.identity_ranges, folder.identity_ranges)
  for i in range(7):
    assert built.read(i) == folder.read(i)
    np.testing.assert_array_equal(built[i]["image"], folder[i]["image"])


def test_synthetic_faces_build_equals_the_generator(tmp_path):
  from face_jax.data.synthetic import SyntheticFaces  # pylint: disable=import-outside-toplevel
  options = {"num_train_ids": 12, "images_per_id": [2, 3], "meta_ids_per_group": 1,
             "meta_images_per_id": 2, "test_ids_per_group": 2, "test_images_per_id": 2,
             "group_fractions": [0.6, 0.2, 0.2], "seed": 5}
  config = tfds_builders.make_config("face_synthetic", "small",
                                     {"train": [], "meta": [], "test": []}, options=options)
  tfds_builders.build("face_synthetic", config, str(tmp_path))
  world = SyntheticFaces(tfds_builders.synthetic_data_config(options), seed=5)
  for split in ("train", "meta", "test"):
    source = tfds_build.open_split(str(tmp_path), "face_synthetic/small", split).source
    want = world.examples(split, np.arange(world.size(split)))
    assert len(source) == world.size(split)
    for i in range(len(source)):
      row = source[i]
      for key, values in want.items():
        np.testing.assert_array_equal(row[key], values[i], err_msg=f"{split} {i} {key}")


def test_bad_records_are_counted_named_and_limited(tmp_path, caplog):
  examples = [{"image": _jpeg(_image(i)), "label": i // 2} for i in range(10)]
  examples[3]["image"] = b"\xff\xd8\xff corrupt"
  write_recordio(tmp_path / "bad", examples)

  def config(name, fraction):
    return tfds_builders.make_config("face_recordio", name, {"train": [str(tmp_path / "bad")]},
                                     max_bad_fraction=fraction)

  with caplog.at_level(logging.WARNING):
    summary = tfds_builders.build("face_recordio", config("lenient", 0.2), str(tmp_path / "o"))
  assert summary["splits"]["train"]["examples"] == 9
  assert summary["splits"]["train"]["skipped"] == 1
  assert "bad.rec: record key 4" in summary["skipped"][0]  # image 3 = key 4 (header at 0)
  assert "bad.rec: record key 4" in caplog.text
  # The kept rows still map identities to contiguous ranges (identity 1 lost one image).
  source = tfds_builders.TfdsFaceSource(str(tmp_path / "o"), "face_recordio/lenient")
  np.testing.assert_array_equal(source.identity_ranges, [[0, 2], [2, 3], [3, 5], [5, 7], [7, 9]])
  with pytest.raises(tfds_build.BuildError, match="1 of 10 records are bad.*\n.*key 4"):
    tfds_builders.build("face_recordio", config("strict", 0.0), str(tmp_path / "o"))
  missing = tfds_builders.make_config("face_recordio", "m", {"train": [str(tmp_path / "nope")]})
  with pytest.raises(tfds_build.BuildError, match="nope.rec does not exist"):
    tfds_builders.build("face_recordio", missing, str(tmp_path / "o"))


def test_build_command_recordio_with_attributes_and_groups(rec, tmp_path, capsys):
  from face_jax.data import build  # pylint: disable=import-outside-toplevel
  root = rec["root"]
  args = ["--dataset=recordio", f"--data_dir={root}", "--name=cmd", f"--out={tmp_path}",
          f"--group_of_class={root / 'groups.npy'}", f"--attributes=train={root / 'attrs.npz'}",
          f"--attributes=meta={root / 'meta_attrs.npz'}"]
  assert build.main(args) == 0
  out = capsys.readouterr().out
  assert "tfds_name=face_recordio/cmd" in out
  assert [line.split()[:2] for line in out.splitlines() if line.split()[:1] in
          (["train"], ["meta"])] == [["train", "20"], ["meta", "10"]]
  assert build.main(["--dataset=verification", f"--data_dir={tmp_path / 'none'}",
                     f"--out={tmp_path}"]) == 1
  assert "holds no .bin" in capsys.readouterr().err


def test_real_data_task_reads_a_build_like_the_files(rec):
  """The MvCoM real-data task (train + meta batches, groups, variations) gives the same
  batches from the build (groups from its metadata) as from the .rec files."""
  import optax  # pylint: disable=import-outside-toplevel
  from configs import mvcom as mvcom_config  # pylint: disable=import-outside-toplevel
  from face_jax import train  # pylint: disable=import-outside-toplevel

  def task(**data):
    c = mvcom_config.get_config("l2rw")
    c.batch_size = 4
    c.model.update(layers=(1,), widths=(4,), embed_dim=8)
    c.data.update(name="real", image_size=SIZE, meta_batch_size=2, read_threads=1,
                  prefetch_batches=2, train_variation_rate=0.5, **data)
    c.mvcom.factors = (("group", 3), ("pose", 1))
    return train.make_task_with(c, optax.sgd(0.1), optax.constant_schedule(0.1))

  root = rec["root"]
  direct = task(rec_prefix=str(root / "train"), meta_rec_prefix=str(root / "meta"),
                group_of_class=str(root / "groups.npy"))
  built = task(source="tfds", tfds_dir=rec["out"], tfds_name="face_recordio/tiny",
               tfds_meta_split="meta")
  for _ in range(6):  # past the first epoch of the 20-image pack
    want, got = next(direct.train_data), next(built.train_data)
    assert set(got) >= {"group", "meta_group", "meta_image", "pose"}
    _assert_equal(got, want)
