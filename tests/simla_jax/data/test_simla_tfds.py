"""TFDS array_record builds of SIMLA data: read back through grain they give exactly the
direct readers' examples; bad inputs are counted and named."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from simla_jax.data import default_data_config, pipeline, tfds_builders
from train_jax import tfds_build


def _write_jpeg(path, seed, size=(40, 30)):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (*size, 3), np.uint8)).save(path, quality=90)


@pytest.fixture(scope="module")
def albef(tmp_path_factory):
  """An ALBEF-style image folder + pretraining list, retrieval train (image_id) and eval."""
  root = tmp_path_factory.mktemp("albef")
  (root / "images").mkdir()
  for i in range(12):
    _write_jpeg(root / "images" / f"{i}.jpg", i, size=(30 + i, 40))
  words = ["a dog", "a cat", "the dog runs", "a cat sits", "dog and cat"]
  pretrain = [{"image": f"{i}.jpg", "caption": [words[i % 5], words[(i + 2) % 5]]}
              for i in range(10)]
  pretrain2 = [{"image": f"{i}.jpg", "caption": words[i % 5]} for i in (10, 11)]
  train = [{"image": f"{i // 2}.jpg", "caption": words[i % 5], "image_id": f"coco_{i // 2}"}
           for i in range(10)]
  test = [{"image": f"{i}.jpg", "caption": [words[i % 5], words[(i + 1) % 5]]}
          for i in range(6, 12)]
  files = {}
  for name, records in [("pretrain", pretrain), ("pretrain2", pretrain2), ("train", train),
                        ("test", test)]:
    files[name] = str(root / f"{name}.json")
    (root / f"{name}.json").write_text(json.dumps(records))
  vocab = root / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "dog",
                              "cat", "runs", "sits", "and"]))
  out = str(root / "tfds")
  config = tfds_builders.make_config(
      "simla_captions", "tiny", {"train": [files["pretrain"], files["pretrain2"]],
                                 "retrieval_train": [files["train"]], "test": [files["test"]]},
      image_root=str(root / "images"))
  summary = tfds_builders.build("simla_captions", config, out)
  return {"root": root, "files": files, "vocab": str(vocab), "out": out, "summary": summary}


def _data_cfg(albef, source, train_files):
  cfg = default_data_config()
  cfg.name = "captions"
  cfg.image_size = 32
  cfg.mim.update(patch_size=8, num_masking_patches=4)
  cfg.captions.update(train_files=tuple(train_files), eval_files=(albef["files"]["test"],),
                      image_root=str(albef["root"] / "images"))
  cfg.tokenizer.vocab_file = albef["vocab"]
  cfg.source = source
  cfg.tfds_dir = albef["out"]
  cfg.tfds_name = "simla_captions/tiny"
  return cfg


def _iter(cfg, split="train", process_index=0, process_count=1):
  return pipeline.make_train_iterator(cfg, batch_size=4, split=split,
                                      process_index=process_index, process_count=process_count)


def _assert_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_build_summary_counts_examples_and_bytes(albef):
  splits = albef["summary"]["splits"]
  assert {k: v["examples"] for k, v in splits.items()} == {
      "train": 12, "retrieval_train": 10, "test": 6}
  assert all(v["bytes"] > 0 and v["skipped"] == 0 for v in splits.values())
  assert "train" in tfds_build.format_summary(albef["summary"])


def test_records_hold_the_files_bytes_captions_and_image_ids(albef):
  images = albef["root"] / "images"
  train = tfds_build.open_split(albef["out"], "simla_captions/tiny", "retrieval_train").source
  records = json.loads(open(albef["files"]["train"]).read())
  assert len(train) == len(records)
  for i, want in enumerate(records):
    got = train[i]
    assert got["image"] == (images / want["image"]).read_bytes()  # not re-encoded
    assert tfds_build.texts(got["captions"]) == [want["caption"]]
    assert tfds_build.text(got["image_id"]) == want["image_id"]


def test_train_batches_equal_the_direct_reader_and_resume_exactly(albef):
  files = [albef["files"]["pretrain"], albef["files"]["pretrain2"]]
  direct, built = _iter(_data_cfg(albef, "direct", files)), _iter(_data_cfg(albef, "tfds", files))
  for _ in range(4):  # 3 batches per epoch: crosses into the second (reshuffled) epoch
    _assert_equal(next(built), next(direct))
  state = built.get_state()
  expected = [next(built) for _ in range(3)]
  resumed = _iter(_data_cfg(albef, "tfds", files))
  resumed.set_state(state)
  for want in expected:
    _assert_equal(next(resumed), want)



def test_process_shards_equal_the_direct_readers_shards(albef):
  files = [albef["files"]["pretrain"], albef["files"]["pretrain2"]]
  for pi in range(2):
    direct = _iter(_data_cfg(albef, "direct", files), process_index=pi, process_count=2)
    built = _iter(_data_cfg(albef, "tfds", files), process_index=pi, process_count=2)
    batches = [next(built) for _ in range(3)]
    for got in batches:
      _assert_equal(got, next(direct))
    assert {int(i) % 2 for b in batches for i in b["index"]} == {pi}


def test_eval_data_equals_the_direct_reader(albef):
  files = [albef["files"]["pretrain"]]
  direct = pipeline.make_eval_data(_data_cfg(albef, "direct", files), "test")
  built = pipeline.make_eval_data(_data_cfg(albef, "tfds", files), "test")
  assert built.captions == direct.captions
  np.testing.assert_array_equal(built.text_ids, direct.text_ids)
  np.testing.assert_array_equal(built.txt2img, direct.txt2img)
  _assert_equal(next(built.image_batches(4)), next(direct.image_batches(4)))


def test_shapes_world_build_reads_back_the_rendered_examples(tmp_path):
  direct_cfg = default_data_config()
  direct_cfg.shapes.update(train_size=8, val_size=3)
  options = {"image_size": direct_cfg.image_size, "shapes.train_size": 8, "shapes.val_size": 3}
  config = tfds_builders.make_config("simla_shapes", "small", {"train": [], "val": []},
                                     options=options)
  tfds_builders.build("simla_shapes", config, str(tmp_path))
  built_cfg = default_data_config()
  built_cfg.source, built_cfg.tfds_dir, built_cfg.tfds_name = (
      "tfds", str(tmp_path), "simla_shapes/small")
  for split in ("train", "val"):
    built, direct = pipeline.make_source(built_cfg, split), pipeline.make_source(direct_cfg, split)
    assert len(built) == len(direct)
    for i in range(len(direct)):
      got, want = built[i], direct[i]
      np.testing.assert_array_equal(got["image"], want["image"])
      np.testing.assert_array_equal(got["boxes"], want["boxes"])
      assert (got["captions"], got["phrases"], got["keywords"], got["index"]) == (
          want["captions"], want["phrases"], want["keywords"], want["index"])
  built_cfg.shapes.noise_std = 5.0  # another world: reading the build must refuse
  with pytest.raises(ValueError, match=r"rendered with data.shapes.noise_std=4.0 .* has 5.0"):
    pipeline.make_source(built_cfg, "train")


def test_corrupt_and_missing_images_are_counted_named_and_limited(tmp_path, caplog):
  images = tmp_path / "images"
  images.mkdir()
  for i in range(8):
    _write_jpeg(images / f"{i}.jpg", i)
  jpeg = (images / "3.jpg").read_bytes()
  (images / "3.jpg").write_bytes(jpeg[:len(jpeg) // 3])  # truncated: header fine, data cut
  records = [{"image": f"{i}.jpg", "caption": "a dog"} for i in range(8)]
  records.append({"image": "gone.jpg", "caption": "a cat"})
  (tmp_path / "list.json").write_text(json.dumps(records))

  def config(name, fraction):
    return tfds_builders.make_config("simla_captions", name, {"train": [str(tmp_path / "list.json")]},
                                     image_root=str(images), max_bad_fraction=fraction)

  with caplog.at_level(logging.WARNING):
    summary = tfds_builders.build("simla_captions", config("lenient", 0.25), str(tmp_path / "out"))
  assert summary["splits"]["train"] == {**summary["splits"]["train"], "examples": 7, "skipped": 2}
  assert any("3.jpg" in m and "record 3" in m and "decode" in m for m in summary["skipped"])
  assert any("gone.jpg" in m and "does not exist" in m and "record 8" in m
             for m in summary["skipped"])
  assert "gone.jpg" in caplog.text and "3.jpg" in caplog.text
  with pytest.raises(tfds_build.BuildError, match=r"2 of 9 records are bad.*\n.*3\.jpg"):
    tfds_builders.build("simla_captions", config("strict", 0.1), str(tmp_path / "out"))


def test_missing_inputs_and_builds_are_named(tmp_path):
  config = tfds_builders.make_config("simla_captions", "x", {"train": [str(tmp_path / "no.json")]})
  with pytest.raises(tfds_build.BuildError, match="no.json does not exist"):
    tfds_builders.build("simla_captions", config, str(tmp_path))
  cfg = default_data_config()
  cfg.source, cfg.tfds_dir, cfg.tfds_name = "tfds", str(tmp_path), "simla_captions/nothing"
  with pytest.raises(FileNotFoundError, match="simla_captions/nothing.*build it first"):
    pipeline.make_source(cfg, "train")


def test_build_command_preset_prints_summary_and_fails_naming_missing_files(tmp_path, capsys):
  from simla_jax.data import build  # pylint: disable=import-outside-toplevel
  for i in range(3):
    _write_jpeg(tmp_path / f"{i}.jpg", i)
  (tmp_path / "flickr30k_train.json").write_text(json.dumps(
      [{"image": f"{i}.jpg", "caption": "a dog", "image_id": i} for i in range(3)]))
  (tmp_path / "flickr30k_val.json").write_text(json.dumps([{"image": "0.jpg", "caption": ["a"]}]))
  args = ["--dataset=flickr30k", f"--data_dir={tmp_path}", f"--out={tmp_path / 'out'}"]
  assert build.main(args) == 1  # flickr30k_test.json is missing
  assert "flickr30k_test.json does not exist" in capsys.readouterr().err
  (tmp_path / "flickr30k_test.json").write_text(json.dumps([{"image": "2.jpg", "caption": ["a"]}]))
  assert build.main(args) == 0
  out = capsys.readouterr().out
  assert "tfds_name=simla_captions/flickr30k" in out
  assert build.main(args) == 1  # an existing build is kept unless --overwrite
  assert "already holds a build" in capsys.readouterr().err
  assert build.main(args + ["--overwrite"]) == 0
  out = capsys.readouterr().out
  assert [line.split()[:2] for line in out.splitlines() if line.split()[:1] in
          (["train"], ["val"], ["test"])] == [["train", "3"], ["val", "1"], ["test", "1"]]
  source = tfds_builders.TfdsCaptionSource(str(tmp_path / "out"), "simla_captions/flickr30k",
                                           "train")
  assert [source[i]["image_id"] for i in range(3)] == ["0", "1", "2"]


def test_vqa_nlvr_ve_refcoco_builders_parse_their_json(tmp_path):
  for i in range(2):
    _write_jpeg(tmp_path / f"{i}.jpg", i)
  files = {
      "vqa": [{"image": "0.jpg", "question": "what is it?", "question_id": 7,
               "answer": ["dog", "dog", "cat"], "dataset": "vqa"},
              {"image": "1.jpg", "question": "colour?", "question_id": 8, "answer": "red",
               "dataset": "vg"}],
      "nlvr": [{"images": ["0.jpg", "1.jpg"], "sentence": "two dogs", "label": "True"}],
      "ve": [{"image": "1", "sentence": "a dog", "label": "entailment"}],
      "ref": [{"image": "COCO_train2014_000000000001.jpg", "text": "left dog", "ref_id": 3}],
  }
  for name, records in files.items():
    (tmp_path / f"{name}.json").write_text(json.dumps(records))
  (tmp_path / "answers.json").write_text(json.dumps(["dog", "cat", "red"]))
  (tmp_path / "COCO_train2014_000000000001.jpg").write_bytes((tmp_path / "0.jpg").read_bytes())
  (tmp_path / "dets.json").write_text(json.dumps({"1": [[1, 2, 3, 4], [5, 6, 7, 8]]}))
  out = str(tmp_path / "out")

  def built(builder, name, options=None):
    config = tfds_builders.make_config(builder, name, {"train": [str(tmp_path / f"{name}.json")]},
                                       image_root=str(tmp_path), options=options)
    tfds_builders.build(builder, config, out)
    return tfds_build.open_split(out, f"{builder}/{name}", "train")

  vqa = built("simla_vqa", "vqa", {"answer_list": str(tmp_path / "answers.json"),
                                   "vg_root": str(tmp_path)})
  assert tfds_build.texts(vqa.source[0]["answers"]) == ["dog", "dog", "cat"]
  assert tfds_build.texts(vqa.source[1]["answers"]) == ["red"]
  assert tfds_build.text(vqa.source[1]["dataset"]) == "vg" and tfds_build.text(vqa.source[0]["question_id"]) == "7"
  assert vqa.metadata["answer_list"] == ["dog", "cat", "red"]
  nlvr = built("simla_nlvr2", "nlvr").source[0]
  assert nlvr["label"] == 1 and nlvr["image1"] == (tmp_path / "1.jpg").read_bytes()
  ve = built("simla_snli_ve", "ve").source[0]
  assert tfds_build.text(ve["image_path"]) == "1.jpg" and tfds_build.text(ve["label"]) == "entailment"
  ref = built("simla_refcoco", "ref", {"dets": str(tmp_path / "dets.json")}).source[0]
  np.testing.assert_array_equal(ref["proposals"], [[1, 2, 3, 4], [5, 6, 7, 8]])
  (tmp_path / "bad.json").write_text(json.dumps([{"image": "0.jpg", "question": "q"}]))
  with pytest.raises(tfds_build.BuildError, match=r"bad.json record 0: needs 'question_id'"):
    built("simla_vqa", "bad")
