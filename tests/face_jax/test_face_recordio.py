"""RecordIO reader/writer: packs from the writer and from a by-hand byte builder.

The builder below follows the published layout (spec mvcom.md §4.5) with struct.pack
and explicit chunk boundaries; it shares no code with face_jax.data.recordio.
"""

import io
import multiprocessing
import pickle
import struct
import threading

import numpy as np
import pytest
from PIL import Image

from face_jax.data import recordio
from face_jax.data.recordio import BadRecordError, RecordIO, write_recordio

MAGIC = 0xCED7230A
MAGIC_BYTES = b"\x0a\x23\xd7\xce"  # little-endian 0xCED7230A


# --- by-hand builder ------------------------------------------------------------

def chunk(cflag: int, data: bytes) -> bytes:
  return struct.pack("<II", MAGIC, (cflag << 29) | len(data)) + data + b"\0" * (-len(data) % 4)


def irheader(flag=0, label=0.0, id1=0, id2=0, labels=()):
  return struct.pack("<IfQQ", flag, label, id1, id2) + struct.pack(f"<{len(labels)}f", *labels)


def whole(payload: bytes) -> bytes:
  return chunk(0, payload)


def split(payload: bytes, cuts) -> bytes:
  """Record split at the given aligned offsets, each holding the magic word."""
  out, start = [], 0
  for n, cut in enumerate(cuts):
    assert cut % 4 == 0 and payload[cut:cut + 4] == MAGIC_BYTES
    out.append(chunk(1 if n == 0 else 2, payload[start:cut]))
    start = cut + 4
  out.append(chunk(3, payload[start:]))
  return b"".join(out)


def build(tmp_path, records, keys=None, name="pack", idx_lines=None):
  """Writes records (already framed) back to back; returns the prefix."""
  prefix = tmp_path / name
  keys = list(range(len(records))) if keys is None else keys
  offsets, blob = [], b""
  for rec in records:
    offsets.append(len(blob))
    blob += rec
  (tmp_path / f"{name}.rec").write_bytes(blob)
  lines = idx_lines if idx_lines is not None else [f"{k}\t{o}\n" for k, o in zip(keys, offsets)]
  (tmp_path / f"{name}.idx").write_text("".join(lines))
  return prefix, offsets


def jpeg(color, size=16, mode="RGB") -> bytes:
  out = io.BytesIO()
  Image.new(mode, (size, size), color).save(out, format="JPEG", quality=95)
  return out.getvalue()


def scan(rec_bytes: bytes):
  """Sequential walk of a .rec: [(record offset, [cflags])]."""
  pos, out = 0, []
  while pos < len(rec_bytes):
    start, flags = pos, []
    while True:
      magic, lrec = struct.unpack_from("<II", rec_bytes, pos)
      assert magic == MAGIC
      flags.append(lrec >> 29)
      length = lrec & ((1 << 29) - 1)
      pos += 8 + length + (-length % 4)
      if flags[-1] in (0, 3):
        break
    out.append((start, flags))
  return out


COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 20), (20, 220, 220)]


def insightface_records(image_payloads, ranges, header_flag=2):
  """Header + image records + identity records, keys 0..; ranges are [start, end) keys."""
  a = 1 + len(image_payloads)
  b = a + len(ranges)
  recs = [whole(irheader(header_flag, 0.0, labels=(a, b)[:header_flag] if header_flag <= 2
                         else (a, b, 0)))]
  recs += image_payloads
  recs += [whole(irheader(2, labels=r)) for r in ranges]
  return recs


# --- by-hand packs ---------------------------------------------------------------

def test_hand_built_insightface_pack(tmp_path):
  images = [jpeg(c) for c in COLORS]
  magic_image = images[4][:8] + MAGIC_BYTES + images[4][8:]  # not decodable: read() only
  payloads = [
      whole(irheader(0, 0.0) + images[0]),                         # flag 0, label 0
      whole(irheader(3, 0.0, labels=(0, 7.5, -1)) + images[1]),    # flag 3, label[0] = 0
      whole(irheader(0, 1.0) + images[2]),
      # Magic at payload offsets 8 (inside the IRHeader's id field) and 24 + 8 + 4 = 36:
      split(irheader(0, 1.0, id1=MAGIC) + images[3][:8]
            + MAGIC_BYTES + images[3][8:], cuts=[8, 32]),
      whole(irheader(1, 0.0, labels=(2,)) + magic_image),
  ]
  ranges = [(1, 3), (3, 5), (5, 6)]
  prefix, _ = build(tmp_path, insightface_records(payloads, ranges))
  rec = RecordIO(prefix)
  assert rec.insightface_header == (6, 9)
  assert len(rec) == 5
  assert rec.num_classes == 3                       # no property file: from the header
  np.testing.assert_array_equal(rec.identity_ranges, [[0, 2], [2, 4], [4, 5]])
  assert [rec.label(i) for i in range(5)] == [0, 0, 1, 1, 2]
  np.testing.assert_array_equal(rec.labels(), [0, 0, 1, 1, 2])
  for i in range(3):
    ex = rec[i]
    assert ex["label"] == [0, 0, 1][i]
    assert ex["image"].shape == (16, 16, 3) and ex["image"].dtype == np.uint8
    np.testing.assert_allclose(ex["image"].reshape(-1, 3).mean(0), COLORS[i], atol=3)
  # The multi-part record comes back with the magic words re-inserted.
  assert rec.read(3) == (1, images[3][:8] + MAGIC_BYTES + images[3][8:])
  assert rec.read(4) == (2, magic_image)


def test_hand_built_im2rec_pack_without_header(tmp_path):
  payloads = [whole(irheader(0, float(c % 2)) + jpeg(COLORS[c])) for c in range(4)]
  prefix, _ = build(tmp_path, payloads)
  rec = RecordIO(prefix)
  assert rec.insightface_header is None and len(rec) == 4
  assert [rec[i]["label"] for i in range(4)] == [0, 1, 0, 1]
  assert rec.num_classes == 2                       # scanned from the labels
  with pytest.raises(ValueError, match="not contiguous"):
    rec.identity_ranges  # pylint: disable=pointless-statement


def test_first_record_with_label_vector_and_image_is_not_a_header(tmp_path):
  payloads = [whole(irheader(2, labels=(1, 9)) + jpeg(COLORS[0])),
              whole(irheader(2, labels=(0, 9)) + jpeg(COLORS[1]))]
  rec = RecordIO(build(tmp_path, payloads)[0])
  assert rec.insightface_header is None
  assert [rec[i]["label"] for i in range(2)] == [1, 0]


def test_index_order_and_sparse_keys(tmp_path):
  payloads = [whole(irheader(0, float(k)) + jpeg(COLORS[k])) for k in range(3)]
  prefix, offsets = build(tmp_path, payloads, keys=[7, 3, 11])
  # .idx lines in another order than the file: image i follows the .idx line order.
  lines = [f"11\t{offsets[2]}\n", f"7\t{offsets[0]}\n", f"3\t{offsets[1]}\n"]
  (tmp_path / "pack.idx").write_text("".join(lines))
  rec = RecordIO(prefix)
  assert [rec[i]["label"] for i in range(3)] == [2, 0, 1]


def test_property_file_gives_num_classes(tmp_path):
  prefix, _ = build(tmp_path, insightface_records(
      [whole(irheader(0, 0.0) + jpeg(COLORS[0]))], [(1, 2)]))
  (tmp_path / "property").write_text("85742,112,112\n")
  assert RecordIO(prefix).num_classes == 85742
  # A second pack in the folder leaves the training pack's property alone.
  write_recordio(tmp_path / "meta", [{"image": jpeg(COLORS[0]), "label": 0}],
                 write_property=False)
  assert (tmp_path / "property").read_text() == "85742,112,112\n"
  (tmp_path / "property").write_text("1")
  assert RecordIO(tmp_path / "meta").num_classes == 1
  (tmp_path / "property").write_text("x,112,112")
  with pytest.raises(ValueError, match=r"property: expected 'num_classes,height,width'"):
    RecordIO(prefix)


def test_header_only_pack_without_identity_records(tmp_path):
  # Some packing scripts write [num_images + 1, num_classes] and no identity records.
  payloads = [whole(irheader(0, float(c)) + jpeg(COLORS[c])) for c in (0, 0, 1)]
  recs = [whole(irheader(2, labels=(4, 2)))] + payloads
  rec = RecordIO(build(tmp_path, recs)[0])
  assert rec.insightface_header == (4, 2) and len(rec) == 3
  assert rec.num_classes == 2
  np.testing.assert_array_equal(rec.identity_ranges, [[0, 2], [2, 3]])


# --- writer ----------------------------------------------------------------------

def test_writer_round_trip_matches_index_and_layout(tmp_path):
  examples = [{"image": np.full((16, 16, 3), COLORS[c], np.uint8), "label": c}
              for c in (0, 0, 1, 3, 3)]                 # class 2 has no images
  n = write_recordio(tmp_path / "train", examples, num_classes=5)
  assert n == 5
  assert (tmp_path / "property").read_text() == "5,16,16"
  rec = RecordIO(tmp_path / "train")
  assert rec.insightface_header == (6, 11) and len(rec) == 5 and rec.num_classes == 5
  np.testing.assert_array_equal(rec.identity_ranges, [[0, 2], [2, 3], [3, 3], [3, 5], [5, 5]])
  for i, ex in enumerate(examples):
    got = rec[i]
    assert got["label"] == ex["label"]
    np.testing.assert_allclose(got["image"].astype(float), ex["image"], atol=3)
  # The .idx offsets are where a sequential walk finds each record, keys 0..10.
  walk = scan((tmp_path / "train.rec").read_bytes())
  idx = [tuple(map(int, line.split("\t"))) for line in
         (tmp_path / "train.idx").read_text().splitlines()]
  assert idx == [(k, off) for k, (off, _) in enumerate(walk)]
  # Header: flag 2, label vector [A, B], no image bytes.
  blob = (tmp_path / "train.rec").read_bytes()
  assert struct.unpack_from("<IIIfQQff", blob) == (MAGIC, 32, 2, 0.0, 0, 0, 6.0, 11.0)


def test_writer_splits_payloads_at_aligned_magic(tmp_path):
  # Payload = 24-byte IRHeader + image: magic at image offsets 4 and 12 -> payload
  # offsets 28 and 36 (aligned); the one at image offset 18 is not aligned.
  image = b"abcd" + MAGIC_BYTES + b"efgh" + MAGIC_BYTES + b"ij" + MAGIC_BYTES + b"k"
  write_recordio(tmp_path / "m", [{"image": image, "label": 0},
                                  {"image": MAGIC_BYTES * 2, "label": 0}],
                 insightface_header=False)
  walk = scan((tmp_path / "m.rec").read_bytes())
  assert [flags for _, flags in walk] == [[1, 2, 3], [1, 2, 3]]
  rec = RecordIO(tmp_path / "m")
  assert rec.read(0) == (0, image) and rec.read(1) == (0, MAGIC_BYTES * 2)
  # The same bytes framed by hand read identically.
  payload = irheader(0, 0.0) + image
  prefix, _ = build(tmp_path, [split(payload, [28, 36])], name="h")
  assert (tmp_path / "h.rec").read_bytes() == (tmp_path / "m.rec").read_bytes()[
      :len((tmp_path / "h.rec").read_bytes())]
  assert RecordIO(prefix).read(0) == (0, image)


def test_writer_label_vectors_and_plain_layout(tmp_path):
  write_recordio(tmp_path / "v", [{"image": jpeg(COLORS[0]), "label": [4.0, 0.5, 2.0]}],
                 insightface_header=False)
  blob = (tmp_path / "v.rec").read_bytes()
  assert struct.unpack_from("<IIIfQQfff", blob)[2:] == (3, 0.0, 0, 0, 4.0, 0.5, 2.0)
  rec = RecordIO(tmp_path / "v")
  assert rec.insightface_header is None and rec[0]["label"] == 4


def test_writer_refuses_unsorted_labels(tmp_path):
  examples = [{"image": jpeg(COLORS[0]), "label": 1}, {"image": jpeg(COLORS[0]), "label": 0}]
  with pytest.raises(ValueError, match="example 1 has label 0 after label 1"):
    write_recordio(tmp_path / "u", examples)


# --- bad input -------------------------------------------------------------------

def _small_pack(tmp_path):
  payloads = [whole(irheader(0, 0.0) + jpeg(COLORS[c])) for c in range(3)]
  return build(tmp_path, insightface_records(payloads, [(1, 4)]))


def test_wrong_magic_names_file_key_and_offset(tmp_path):
  prefix, offsets = _small_pack(tmp_path)
  blob = bytearray((tmp_path / "pack.rec").read_bytes())
  blob[offsets[2]:offsets[2] + 4] = b"\xde\xad\xbe\xef"
  (tmp_path / "pack.rec").write_bytes(bytes(blob))
  rec = RecordIO(prefix)
  rec[0]
  with pytest.raises(BadRecordError, match=rf"pack\.rec: record key 2 at offset {offsets[2]}: "
                     r"wrong magic 0xEFBEADDE"):
    rec[1]
  # In the header record the pack cannot be opened at all.
  blob[0:4] = b"\0\0\0\0"
  (tmp_path / "pack.rec").write_bytes(bytes(blob))
  with pytest.raises(ValueError, match=r"pack\.rec: record key 0 at offset 0: wrong magic"):
    RecordIO(prefix)


def test_truncated_final_record(tmp_path):
  payloads = [whole(irheader(0, float(c)) + jpeg(COLORS[c])) for c in range(2)]
  prefix, offsets = build(tmp_path, payloads)
  blob = (tmp_path / "pack.rec").read_bytes()
  (tmp_path / "pack.rec").write_bytes(blob[:-40])
  rec = RecordIO(prefix)
  assert rec[0]["label"] == 0
  with pytest.raises(BadRecordError, match=rf"pack\.rec: record key 1 at offset {offsets[1]}: "
                     r"truncated: chunk .* declares \d+ payload bytes but only \d+ remain "
                     r"before the end of the file"):
    rec[1]


def test_truncated_continuation_chunk(tmp_path):
  payload = irheader(0, 0.0) + b"abcd" + MAGIC_BYTES + b"rest of it"
  prefix, _ = build(tmp_path, [split(payload, [28])])
  blob = (tmp_path / "pack.rec").read_bytes()
  (tmp_path / "pack.rec").write_bytes(blob[:36 + 6])   # cut inside the second chunk header
  with pytest.raises(BadRecordError, match=r"record key 0 at offset 0: truncated"):
    RecordIO(prefix).read(0)


def test_idx_offset_past_end(tmp_path):
  prefix, offsets = _small_pack(tmp_path)
  lines = (tmp_path / "pack.idx").read_text().splitlines(keepends=True)
  lines[3] = "3\t999999\n"
  (tmp_path / "pack.idx").write_text("".join(lines))
  with pytest.raises(ValueError, match=r"pack\.idx: line 4: key 3 has offset 999999, past the "
                     r"end of .*pack\.rec"):
    RecordIO(prefix)


def test_idx_malformed_line_and_misaligned_offset(tmp_path):
  prefix, _ = _small_pack(tmp_path)
  good = (tmp_path / "pack.idx").read_text()
  (tmp_path / "pack.idx").write_text(good.replace("2\t", "2 x\t", 1))
  with pytest.raises(ValueError, match=r"pack\.idx: line 3 is"):
    RecordIO(prefix)
  (tmp_path / "pack.idx").write_text(good + "9\t6\n")
  with pytest.raises(ValueError, match=r"line 6: key 9 has offset 6, which is not 4-byte"):
    RecordIO(prefix)


def test_header_with_wrong_flag(tmp_path):
  payloads = [whole(irheader(0, 0.0) + jpeg(COLORS[0]))]
  prefix, _ = build(tmp_path, insightface_records(payloads, [(1, 2)], header_flag=3))
  with pytest.raises(ValueError, match=r"record key 0 at offset 0: the insightface header .* "
                     r"label flag 3; it must be 2"):
    RecordIO(prefix)


def test_label_flag_larger_than_payload(tmp_path):
  # flag 500 announces 2000 bytes of labels; the payload is much shorter.
  payloads = [whole(irheader(0, 0.0) + jpeg(COLORS[0])),
              whole(struct.pack("<IfQQ", 500, 0.0, 0, 0) + b"\0" * 16)]
  prefix, offsets = build(tmp_path, insightface_records(payloads, [(1, 3)]))
  rec = RecordIO(prefix)
  with pytest.raises(BadRecordError, match=rf"record key 2 at offset {offsets[2]}: label flag "
                     r"500 announces 500 float32 labels"):
    rec[1]


def test_header_pointing_past_index(tmp_path):
  recs = [whole(irheader(2, labels=(10, 12)))] + [whole(irheader(0, 0.0) + jpeg(COLORS[0]))]
  with pytest.raises(ValueError, match=r"images are keys 1\.\.9 but .*pack\.idx has no key 9"):
    RecordIO(build(tmp_path, recs)[0])


def test_identity_record_outside_images(tmp_path):
  payloads = [whole(irheader(0, 0.0) + jpeg(COLORS[0]))]
  prefix, offsets = build(tmp_path, insightface_records(payloads, [(1, 7)]))
  with pytest.raises(ValueError, match=rf"record key 2 at offset {offsets[2]}: identity 0 range "
                     r"\[1, 7\) is not inside"):
    RecordIO(prefix).identity_ranges  # pylint: disable=expression-not-assigned


def test_undecodable_image_and_non_integer_label(tmp_path):
  payloads = [whole(irheader(0, 0.0) + b"not an image"), whole(irheader(0, 1.5) + jpeg(COLORS[0])),
              whole(irheader(1, labels=(float("inf"),)) + jpeg(COLORS[0]))]
  prefix, offsets = build(tmp_path, insightface_records(payloads, [(1, 4)]))
  rec = RecordIO(prefix)
  with pytest.raises(BadRecordError, match=rf"key 1 at offset {offsets[1]}: not an image format"):
    rec[0]
  with pytest.raises(BadRecordError, match=r"key 2 .*label 1\.5 is not a class id"):
    rec[1]
  with pytest.raises(BadRecordError, match=r"key 3 .*label inf is not a class id"):
    rec.label(2)
  with pytest.raises(IndexError):
    rec[3]


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing.rec"):
    RecordIO(tmp_path / "nothing")


# --- decoding and concurrency --------------------------------------------------------

def test_decode_grayscale_and_png_to_rgb():
  gray = jpeg(128, mode="L")
  img = recordio.decode_image(gray, "g")
  assert img.shape == (16, 16, 3) and abs(int(img.mean()) - 128) <= 2
  out = io.BytesIO()
  Image.new("RGBA", (5, 7), (1, 2, 3, 4)).save(out, format="PNG")
  img = recordio.decode_image(out.getvalue(), "p")
  assert img.shape == (7, 5, 3) and tuple(img[0, 0]) == (1, 2, 3)
  with pytest.raises(BadRecordError, match="where: cannot decode|where: not an image"):
    recordio.decode_image(jpeg((1, 2, 3))[:60], "where")


def test_pillow_and_simplejpeg_agree(monkeypatch):
  if recordio.simplejpeg is None:
    pytest.skip("simplejpeg not installed")
  data = jpeg((90, 140, 200), size=32)
  fast = recordio.decode_image(data, "x")
  monkeypatch.setattr(recordio, "simplejpeg", None)
  slow = recordio.decode_image(data, "x")
  assert np.abs(fast.astype(int) - slow).max() <= 2


def test_threads_pickle_and_forked_process(tmp_path):
  examples = [{"image": jpeg(COLORS[i % 5]), "label": i // 4} for i in range(20)]
  write_recordio(tmp_path / "t", examples)
  rec = RecordIO(tmp_path / "t")
  expected = [rec.read(i) for i in range(20)]
  results = {}

  def work(t):
    results[t] = [rec.read(i) for i in np.random.default_rng(t).permutation(20)]

  threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for t in range(4):
    assert results[t] == [expected[i] for i in np.random.default_rng(t).permutation(20)]
  clone = pickle.loads(pickle.dumps(rec))
  assert clone._fd is None and clone.read(7) == expected[7]   # pylint: disable=protected-access
  # A forked child opens its own descriptor (the parent's already exists).
  with multiprocessing.get_context("fork").Pool(1) as pool:
    assert pool.map(_read_in_child, [(rec, 13)]) == [expected[13]]


def _read_in_child(args):
  rec, i = args
  return rec.read(i)
