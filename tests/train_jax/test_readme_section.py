import pytest

from train_jax import readme_section


def test_only_the_named_section_is_replaced():
  begin, end = readme_section.markers("study")
  other_begin, other_end = readme_section.markers("other")
  text = f"a\n{begin}\nold\n{end}\n{other_begin}\nkeep\n{other_end}\nb\n"
  assert readme_section.replace(text, "study", "new\n") == (
      f"a\n{begin}\nnew\n{end}\n{other_begin}\nkeep\n{other_end}\nb\n")


@pytest.mark.parametrize("text", ["no markers", "<!-- study:end -->\n<!-- study:begin -->",
                                  "<!-- study:begin -->\n<!-- study:end -->" * 2])
def test_missing_swapped_or_repeated_markers_are_refused(text):
  with pytest.raises(ValueError, match="study:begin"):
    readme_section.replace(text, "study", "x")


def test_update_file_leaves_a_file_without_the_section_untouched(tmp_path):
  path = tmp_path / "README.md"
  path.write_text("# title\n")
  with pytest.raises(ValueError):
    readme_section.update_file(str(path), "study", "table\n")
  assert path.read_text() == "# title\n"
