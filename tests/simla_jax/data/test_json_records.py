"""json_records: reading a records file and the errors that name it."""

import pytest

from simla_jax.data import captions, entailment, json_records, nlvr, refcoco, vqa


def test_read_text_returns_the_contents(tmp_path):
  (tmp_path / "a.json").write_text('[{"k": "é"}]', encoding="utf-8")
  assert json_records.read_text(str(tmp_path / "a.json"), "x") == '[{"k": "é"}]'


@pytest.mark.parametrize("read, what", [
    (captions.read_caption_file, "captions"), (entailment.read_ve_file, "ve"),
    (vqa.read_json_records, "vqa"), (nlvr.read_nlvr_file, "nlvr"),
    (lambda p: refcoco.read_expressions(p, with_ref_id=False), refcoco.WHAT)])
def test_a_missing_file_is_named_with_its_reader(read, what, tmp_path):
  missing = str(tmp_path / "missing.json")
  with pytest.raises(FileNotFoundError, match=f"^{what}: cannot read {missing}: "):
    read(missing)
