"""Shapes-world VQA: every answer is the scene graph's, in the closed answer list."""

import collections

import pytest

from simla_jax.data import default_data_config, entailment, shapes, vqa_shapes
from simla_jax.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def examples():
  c = default_data_config()
  c.image_size = 32
  src = vqa_shapes.ShapesVqa(c, "val", num_images=60)
  return src, [src[i] for i in range(len(src))]


def _objects(src, ex):
  return src.source[ex["index"] // len(vqa_shapes.KINDS)]["objects"]


def _named(objects, name, attribute):
  """Objects a colour-less / shape-less name ("large circle", "red") fits."""
  words = name.split()
  size = words[0] if len(words) == 2 else None
  return [o for o in objects if o[attribute] == words[-1] and size in (None, o["size"])]


def test_answers_follow_the_scene_graph(examples):
  src, exs = examples
  for ex in exs:
    objects, q, (answer,) = _objects(src, ex), ex["question"], ex["answers"]
    if ex["kind"] == "colour":
      (obj,) = _named(objects, q.removeprefix("what colour is the "), "shape")
      assert answer == obj["colour"]
    elif ex["kind"] == "shape":
      (obj,) = _named(objects, q.removeprefix("what shape is the ").removesuffix(" object"),
                      "colour")
      assert answer == obj["shape"]
    elif ex["kind"] == "count":
      colour = q.split()[2]
      n = len(objects) if colour == "shapes" else sum(o["colour"] == colour for o in objects)
      assert answer == shapes.NUMBER_WORDS[n]
    elif ex["kind"] == "exists":
      colour, shape = q.split()[-2:]
      present = any((o["colour"], o["shape"]) == (colour, shape) for o in objects)
      assert answer == ("yes" if present else "no")
    else:
      by_phrase = {o["phrase"]: o for o in objects}
      body = q.removeprefix("is ")
      (a_phrase, relation, b_phrase), = [
          (p, r, body[len(p) + len(r) + 2:]) for p in by_phrase for r in entailment._RELATIONS
          if body.startswith(f"{p} {r} ") and body[len(p) + len(r) + 2:] in by_phrase]
      truth = entailment.holds(relation, by_phrase[a_phrase], by_phrase[b_phrase])
      assert answer == ("yes" if truth else "no")
    assert ex["gt_answers"] == [answer] * 10 and ex["weights"] == [1.0]
  vqa_shapes.check_answers(exs, src.answer_list)


def test_every_kind_occurs_and_yes_no_are_balanced(examples):
  _, exs = examples
  kinds = collections.Counter(ex["kind"] for ex in exs)
  assert set(kinds) == set(vqa_shapes.KINDS)
  yes_no = collections.Counter(ex["answers"][0] for ex in exs if ex["kind"] in ("exists", "relation"))
  assert 0.35 < yes_no["yes"] / (yes_no["yes"] + yes_no["no"]) < 0.65


def test_examples_are_deterministic_and_tokenise_without_unknown_words(examples):
  src, exs = examples
  again = src[7]
  assert (again["question"], again["answers"]) == (exs[7]["question"], exs[7]["answers"])
  words = shapes.vocabulary(None) + vqa_shapes.vocabulary()
  tok = Tokenizer.from_words(words, max_len=32)
  for ex in exs:
    for text in (ex["question"], ex["answers"][0]):
      assert tok.unk_id not in tok(text)[0], text


def test_answer_outside_the_list_is_named():
  ex = {"question_id": 4, "question": "what colour is the star", "answers": ["pink"]}
  with pytest.raises(ValueError, match="question 4 .* answer 'pink' outside the answer list"):
    vqa_shapes.check_answers([ex], vqa_shapes.answer_list(4))
