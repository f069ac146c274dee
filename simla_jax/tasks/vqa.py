"""SIMLA VQA: answer-decoder fine-tuning and answer-list ranking (official VQA.py,
models/simla/vqa.py).

  python run.py --config=configs/simla_vqa.py                      # shapes world
  python run.py --config=configs/simla_vqa.py:vqa --config.init.checkpoint=CKPT ...

Model: the pretrained ViT and BERT encode (question, image) in multimodal mode; a
causal answer decoder (`simla_jax.models.answer_decoder`) cross-attends to those
question states and predicts the answer's tokens ([CLS] answer [SEP]). The decoder is
initialised from the BERT as the official key remap does: embeddings, MLM head and
encoder layers [decoder.first_layer, + decoder.layers) (official: 6 layers from 6-11).

Loss (per question b with answers a, weights w_ba: VQA's share of humans per answer):
  loss = sum_{b,a} w_ba * L(b, a) / B,  L = (1 - alpha) LM + alpha distill,
  LM = sum over answer tokens of -log p(token), distill = sum over answer tokens of the
  cross-entropy against the momentum decoder's softmax (momentum ViT, BERT, decoder,
  EMA `model.momentum` before each use). Official bugs behind `compat` flags (off by
  default): `alpha_not_passed` (the official decoder call never gets alpha, so the
  distillation weight is 0 although the momentum model runs), `distill_over_sequence`
  (log_softmax over the sequence axis in the distillation term).

Inference ranks `answer_list`: p(first answer token | [CLS]) of every answer, the
`k_test` most probable, then their full-sequence log-likelihoods; the best one is the
prediction. `compat.rank_first_token_twice` adds the first token's log-probability a
second time, as the official score (log p_first + the sequence log-likelihood) does.
Evaluation: VQA accuracy (%) where human answers are given (also per question kind and
for the training set's majority answer, per kind on the shapes world), and the EvalAI
result JSON `[{"question_id", "answer"}]` of `eval.result_splits` in the workdir.

`question_only=True` zeroes every image: the same network without visual information.
"""

import dataclasses
import functools
import json
import os
from typing import Any, Mapping, Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from simla_jax import objectives as obj
from simla_jax.data import pipeline
from simla_jax.data import vqa as vqa_data
from simla_jax.data import vqa_shapes
from simla_jax.data.tokenizer import Tokenizer
from simla_jax.models import SIMLA, answer_decoder, ema_update, init_params
from simla_jax.tasks import finetune
from simla_jax.tasks import retrieval as rt
from simla_jax.tasks import ve
from train_jax import optimizers
from train_jax.state import TrainState
from train_jax.task import Task

ENCODERS = ("vit", "bert")
DROPPED = {"vit": ("mask_token",)}   # the BERT keeps its MLM head: the decoder starts from it
HUMANS = vqa_shapes.HUMAN_ANSWERS


# --------------------------------------------------------------------------- objectives
def answer_lm_loss(logits_r_l_v, logits_m_r_l_v, ids_r_l, mask_r_l, alpha,
                   distill_over_sequence: bool = False):
  """Per answer row: (1 - alpha) LM + alpha distill, each summed over answer tokens.

  Position t predicts token t + 1; padding ([PAD], mask 0) takes no part. With
  `logits_m` None the LM term alone. `distill_over_sequence`: the official bug.
  """
  logits = logits_r_l_v[:, :-1].astype(jnp.float32)
  targets, valid = ids_r_l[:, 1:], mask_r_l[:, 1:].astype(jnp.float32)
  lm = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * valid, -1)
  if logits_m_r_l_v is None:
    return lm
  soft = jax.nn.softmax(jax.lax.stop_gradient(logits_m_r_l_v[:, :-1]).astype(jnp.float32), -1)
  log_p = jax.nn.log_softmax(logits, axis=1 if distill_over_sequence else -1)
  distill = jnp.sum(-jnp.sum(log_p * soft, -1) * valid, -1)
  return (1 - alpha) * lm + alpha * distill


def distill_alpha(step, config):
  """The distillation weight the decoder loss gets: alpha ramped over
  `alpha_warmup_steps`, or 0 with `compat.alpha_not_passed` (the official call never
  passes alpha to the decoder, whose default is 0)."""
  if config.compat.alpha_not_passed:
    return jnp.zeros((), jnp.float32)
  return obj.alpha_at(step, config.alpha, config.alpha_warmup_steps)


def weighted_loss(row_loss_b_a, weights_b_a):
  """sum_{b,a} w * L / B (official `(weights * loss).sum() / image.size(0)`)."""
  return jnp.sum(weights_b_a * row_loss_b_a) / weights_b_a.shape[0]


# --------------------------------------------------------------------------- model
def question_states(model: SIMLA, params, images, ids, mask, rng=None):
  """Multimodal question states (b, l, hidden): the question cross-attends to the image."""
  encoders = {k: params[k] for k in ENCODERS}
  kw = lambda i: ({} if rng is None else
                  dict(deterministic=False, rngs={"dropout": jax.random.fold_in(rng, i)}))
  image_seq = model.apply({"params": encoders}, images, method=SIMLA.embed_image, **kw(0))
  return model.apply({"params": encoders}, ids, mask, image_seq, method=SIMLA.fuse, **kw(1))


def decode(decoder, params, ids, mask, states, states_mask, states_index=None, rng=None):
  """Decoder logits (r, l, vocab) of answer rows over question states."""
  kw = {} if rng is None else dict(deterministic=False, rngs={"dropout": rng})
  return decoder.apply({"params": params["decoder"]}, ids, mask, states, states_mask,
                       states_index_b=states_index, **kw)


def answer_logits(model, decoder, params, images, q_ids, q_mask, a_ids_b_a_l, a_mask_b_a_l,
                  rng=None):
  """Logits (b * a, l, vocab) of every question's `a` answer rows."""
  b, a, length = a_ids_b_a_l.shape
  k_enc, k_dec = (None, None) if rng is None else jax.random.split(rng)
  states = question_states(model, params, images, q_ids, q_mask, k_enc)
  index = jnp.repeat(jnp.arange(b), a)
  return decode(decoder, params, a_ids_b_a_l.reshape(b * a, length),
                a_mask_b_a_l.reshape(b * a, length), states, q_mask, index, k_dec)


def rank_answers(decoder, params, states_b_q_d, q_mask_b_q, answer_ids_n_l, answer_mask_n_l,
                 k: int, first_token_twice: bool = False):
  """Official `rank_answer`: (best answer (b,), top-k answer ids (b, k), scores (b, k)).

  Every answer starts with [CLS] (the decoder's bos); the first-token probabilities of
  all answers select k candidates, re-ranked by the log-likelihood of their whole
  token sequence (+ the first token's log-probability again with `first_token_twice`).
  """
  b = states_b_q_d.shape[0]
  answer_ids_n_l, answer_mask_n_l = jnp.asarray(answer_ids_n_l), jnp.asarray(answer_mask_n_l)
  n = answer_ids_n_l.shape[0]
  if not 0 < k <= n:
    raise ValueError(f"k_test {k} must be in [1, {n}] (the answer list's length)")
  start = jnp.broadcast_to(answer_ids_n_l[:1, :1], (b, 1))
  first = decode(decoder, params, start, jnp.ones_like(start), states_b_q_d, q_mask_b_q)[:, 0]
  first_p_b_n = jax.nn.softmax(first, -1)[:, answer_ids_n_l[:, 1]]
  top_p_b_k, top_b_k = jax.lax.top_k(first_p_b_n, k)
  ids = answer_ids_n_l[top_b_k].reshape(b * k, -1)
  mask = answer_mask_n_l[top_b_k].reshape(b * k, -1)
  logits = decode(decoder, params, ids, mask, states_b_q_d, q_mask_b_q,
                  jnp.repeat(jnp.arange(b), k))
  score_b_k = -answer_lm_loss(logits, None, ids, mask, 0.0).reshape(b, k)
  if first_token_twice:
    score_b_k = score_b_k + jnp.log(top_p_b_k)
  best = jnp.take_along_axis(top_b_k, jnp.argmax(score_b_k, -1)[:, None], -1)[:, 0]
  return best, top_b_k, score_b_k


# --------------------------------------------------------------------------- loading
def make_tokenizers(data_cfg) -> tuple[Tokenizer, Tokenizer, int]:
  """(question tokenizer, answer tokenizer, size of the pretraining vocabulary).

  Answers are `[CLS] answer [SEP]` (the official answer + eos), padded to
  `answer_max_len`. The shapes world's vocabulary gets the question words appended,
  so the pretraining ids are unchanged; a vocab_file is used as it is.
  """
  question, base_size = pipeline.extended_tokenizer(data_cfg, vqa_shapes.vocabulary())
  answer = Tokenizer(list(question.vocab), max_len=int(data_cfg.answer_max_len), add_sep=True,
                     lowercase=bool(data_cfg.tokenizer.lowercase))
  return question, answer, base_size


def tokenize_answers(tokenizer: Tokenizer, answers: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """(ids, mask) (n, answer_max_len) of the answer list; an answer cut short is an error."""
  ids, mask = tokenizer(list(answers))
  for a, m in zip(answers, mask):
    if len(tokenizer.tokens(a)) + 2 > len(m):
      raise ValueError(f"vqa: answer {a!r} needs {len(tokenizer.tokens(a)) + 2} tokens, more "
                       f"than data.answer_max_len {len(m)}")
  return ids, mask


def grow_lm_bias(bert: Mapping[str, Any], vocab_size: int) -> dict:
  """The MLM head's output bias, zero-padded to `vocab_size` rows (new words)."""
  bias = np.asarray(bert["mlm_head"]["bias"])
  if bias.shape[0] >= vocab_size:
    return dict(bert)
  grown = np.concatenate([bias, np.zeros(vocab_size - bias.shape[0], bias.dtype)])
  return dict(bert, mlm_head=dict(bert["mlm_head"], bias=grown))


def check_decoder_config(config, encoder_layers: int) -> tuple[int, int]:
  first, n = int(config.decoder.first_layer), int(config.decoder.layers)
  if n < 1 or not 0 <= first < first + n <= encoder_layers:
    raise ValueError(f"decoder.layers {n} from decoder.first_layer {first}: the encoder has "
                     f"{encoder_layers} layers")
  return first, n


@dataclasses.dataclass
class Loaded:
  model: SIMLA
  decoder: answer_decoder.AnswerDecoder
  tokenizer: Tokenizer
  answer_tokenizer: Tokenizer
  answer_list: list[str]
  answer_ids: np.ndarray     # (n, answer_max_len)
  answer_mask: np.ndarray
  params: dict               # vit, bert, decoder (numpy)
  params_m: dict             # their momentum copies
  source: str
  step: int


def load(config, answer_list: Sequence[str]) -> Loaded:
  """The pretrained encoders, the decoder built from the BERT, tokenizers, answer list."""
  pretrained = rt.load_pretrained(config, dropped=DROPPED)
  tokenizer, answer_tok, base_size = make_tokenizers(config.data)
  params = rt.retrieval_subset(pretrained.params, ENCODERS, DROPPED)
  params_m = rt.retrieval_subset(pretrained.params_m or pretrained.params, ENCODERS, DROPPED)
  hidden = params["bert"]["embeddings"]["word_embeddings"]["embedding"].shape[1]
  n_new = tokenizer.vocab_size - base_size
  new_rows = (np.random.default_rng(int(config.seed)).normal(
      0.0, float(pretrained.model_config.init_std), (n_new, hidden)) if n_new > 0 else None)
  base_cfg = ml_collections.ConfigDict(pretrained.model_config.to_dict())
  if base_cfg.bert.vocab_size == base_size:   # an official .pth's size: the grown vocabulary
    base_cfg.bert.vocab_size = tokenizer.vocab_size
  model_cfg = None
  trees = []
  for tree in (params, params_m):
    tree = ve.grow_vocabulary(tree, base_size, tokenizer.vocab_size, new_rows)
    if model_cfg is None:
      model_cfg = rt.resolve_model_config(base_cfg, tokenizer, tree)
      first, n = check_decoder_config(config, int(model_cfg.bert.layers))
    bert = grow_lm_bias(tree["bert"], tokenizer.vocab_size)
    decoder = answer_decoder.from_encoder(bert, first, n)
    bert = {k: v for k, v in bert.items() if k != "mlm_head"}
    trees.append(dict(tree, bert=bert, decoder=decoder))
  dtype = jnp.dtype(model_cfg.dtype)
  decoder = answer_decoder.from_config(
      model_cfg.bert, config.decoder, init_std=model_cfg.init_std,
      scan_layers=bool(model_cfg.get("scan_layers", False)), remat=bool(model_cfg.remat),
      remat_policy=model_cfg.get("remat_policy", "nothing_saveable"), dtype=dtype,
      attention_impl=model_cfg.attention_impl)
  ids, mask = tokenize_answers(answer_tok, answer_list)
  return Loaded(SIMLA(model_cfg), decoder, tokenizer, answer_tok, list(answer_list), ids, mask,
                trees[0], trees[1], pretrained.source, pretrained.step)


# --------------------------------------------------------------------------- data
def _files(value: str) -> list[str]:
  return [f for f in (s.strip() for s in value.split(",")) if f]


def read_answer_list(config) -> list[str]:
  d = config.data
  if d.name == "shapes":
    return vqa_shapes.answer_list(int(d.shapes.num_objects[1]))
  if not d.vqa.answer_list:
    raise ValueError("data.vqa.answer_list: the official answer_list.json is required")
  return vqa_data.read_answer_list(d.vqa.answer_list)


def make_source(config, split: str, answer_list: Sequence[str]):
  """Shapes-world questions or official VQA / VG-QA files of `split`."""
  d = config.data
  if d.name == "shapes":
    return vqa_shapes.ShapesVqa(d, split, int(config.train_images) if split == "train" else None)
  if d.name == "vqa":
    files = _files(d.vqa.files.get(split, ""))
    if not files:
      raise ValueError(f"data.vqa.files.{split}: the official JSON file(s) of the {split!r} "
                       f"split are required (comma-separated)")
    v = d.vqa
    return vqa_data.VqaJsonSource(files, answer_list, vqa_root=v.vqa_root, vg_root=v.vg_root,
                                  train=split == "train", max_words=int(v.max_words),
                                  check_images=bool(v.check_images), on_error=v.on_error,
                                  outside_list=v.outside_list)
  raise ValueError(f"data.name: {d.name!r} is not a VQA dataset (shapes | vqa)")


class ExampleTransform(pipeline.TaskTransform):
  """(stream position k, example) -> arrays. Training: image, question_ids / mask,
  answer_ids / answer_mask (max_answers, answer_max_len), answer_weight (max_answers,)
  (missing answers weigh 0; beyond max_answers the heaviest are kept). Evaluation:
  image, question ids / mask, question_id, kind (index into vqa_shapes.KINDS or -1),
  gt (HUMANS,) str (human answers, "" padded) and has_gt.
  """

  def __init__(self, data_cfg, tokenizer: Tokenizer, answer_tokenizer: Tokenizer, *,
               seed: int, epoch_length: int, train: bool):
    super().__init__(data_cfg, tokenizer, seed=seed, epoch_length=epoch_length, train=train)
    self.answer_tokenizer = answer_tokenizer
    self.max_answers = int(data_cfg.max_answers)

  def map_with_index(self, k: int, ex: dict) -> dict:
    image, text = self.image_and_text(k, int(ex["index"]), ex["image"],
                                      vqa_data.pre_question(ex["question"], self.max_words))
    ids, mask = self.tokenizer(text)
    out = {"image": image, "question_ids": ids, "question_mask": mask}
    if self.train:
      order = np.argsort(-np.asarray(ex["weights"], np.float64), kind="stable")[:self.max_answers]
      answers = [ex["answers"][i] for i in order]
      weight = np.zeros(self.max_answers, np.float32)
      weight[:len(answers)] = [ex["weights"][i] for i in order]
      a_ids, a_mask = self.answer_tokenizer(answers + [""] * (self.max_answers - len(answers)))
      a_mask[len(answers):] = 0
      a_ids[len(answers):] = self.answer_tokenizer.pad_id
      out.update(answer_ids=a_ids, answer_mask=a_mask, answer_weight=weight)
      return out
    gt = list(ex["gt_answers"])[:HUMANS]
    kind = vqa_shapes.KINDS.index(ex["kind"]) if ex["kind"] else -1
    out.update(question_id=np.int64(ex["question_id"]), kind=np.int32(kind),
               gt=np.array(gt + [""] * (HUMANS - len(gt))), has_gt=np.bool_(bool(gt)))
    return out


def make_train_iterator(config, loaded: Loaded, source) -> grain.DatasetIterator:
  """This process's shard, reshuffled every epoch, repeated, augmented, batched."""
  d = config.data
  return pipeline.task_train_iterator(
      d, source, int(config.batch_size) // jax.process_count(),
      lambda n: ExampleTransform(d, loaded.tokenizer, loaded.answer_tokenizer, seed=int(d.seed),
                                 epoch_length=n, train=True),
      "vqa")


def train_majority(source, limit: int = 0) -> dict[str, str]:
  """The most frequent training answer per question kind ("" = every question), by
  weight; official files are counted from their records, the shapes world from its
  first `limit` questions (0 = all)."""
  counts: dict[str, dict[str, float]] = {}
  if hasattr(source, "records"):
    items = ((("", a, w) for r in source.records for a, w in zip(r["answers"], r["weights"])))
  else:
    n = len(source) if limit <= 0 else min(limit, len(source))
    items = ((kind, a, w) for i in range(n)
             for ex in (source[i],) for kind in ("", ex["kind"])
             for a, w in zip(ex["answers"], ex["weights"]))
  for kind, a, w in items:
    c = counts.setdefault(kind, {})
    c[a] = c.get(a, 0.0) + w
  return {kind: max(c, key=lambda a: (c[a], a)) for kind, c in counts.items()}


# --------------------------------------------------------------------------- evaluation
class Evaluator:
  """VQA accuracy (%) and answers of a split's questions; see `__call__`."""

  def __init__(self, config, loaded: Loaded, sources: Mapping[str, Any],
               majority: Mapping[str, str]):
    self.sources = dict(sources)
    self.majority = dict(majority)
    self.answer_list = loaded.answer_list
    self.batch_size = int(config.eval.batch_size)
    self.threads = int(config.data.loader.num_threads)
    self.transform = ExampleTransform(config.data, loaded.tokenizer, loaded.answer_tokenizer,
                                      seed=0, epoch_length=1, train=False)
    self.results: dict[str, list[dict[str, Any]]] = {}
    self.results_step: dict[str, int] = {}   # the train step each split's results are of
    question_only, twice = bool(config.question_only), bool(config.compat.rank_first_token_twice)
    k = min(int(config.k_test), len(loaded.answer_list))
    answer_ids, answer_mask = jnp.asarray(loaded.answer_ids), jnp.asarray(loaded.answer_mask)

    @jax.jit
    def predict(params, images, ids, mask):
      if question_only:
        images = jnp.zeros_like(images)
      states = question_states(loaded.model, params, images, ids, mask)
      return rank_answers(loaded.decoder, params, states, mask, answer_ids, answer_mask, k,
                          twice)[0]
    self._predict = predict

  def answers(self, params, split: str) -> list[dict[str, Any]]:
    """[{question_id, answer, gt, kind}] over the split, in source order."""
    out = []
    split_batches = finetune.batches(self.sources[split], self.transform, self.batch_size,
                                     self.threads)
    for b, pred in finetune.predict(functools.partial(self._predict, params), split_batches,
                                    self.batch_size, ("image", "question_ids", "question_mask")):
      for i in range(len(pred)):
        gt = [g for g in b["gt"][i] if g] if b["has_gt"][i] else []
        kind = vqa_shapes.KINDS[b["kind"][i]] if b["kind"][i] >= 0 else ""
        out.append({"question_id": int(b["question_id"][i]),
                    "answer": self.answer_list[int(pred[i])], "gt": gt, "kind": kind})
    return out

  def __call__(self, params, splits: Sequence[str], step: int = -1) -> dict[str, float]:
    """<split>_acc, <split>_acc_<kind>, <split>_majority_acc (VQA accuracy, %) for splits
    with human answers; every split's answers are kept in `results` for the result JSON."""
    out = {}
    for split in splits:
      rows = self.answers(params, split)
      self.results[split] = [{"question_id": r["question_id"], "answer": r["answer"]}
                             for r in rows]
      self.results_step[split] = step
      scored = [r for r in rows if r["gt"]]
      if not scored:
        continue
      acc = np.array([vqa_data.vqa_accuracy(r["answer"], r["gt"]) for r in scored])
      majority = np.array([vqa_data.vqa_accuracy(self.majority.get(r["kind"], self.majority[""]),
                                                  r["gt"]) for r in scored])
      out[f"{split}_acc"] = 100.0 * float(acc.mean())
      out[f"{split}_majority_acc"] = 100.0 * float(majority.mean())
      kinds = np.array([r["kind"] for r in scored])
      for kind in vqa_shapes.KINDS:
        if np.any(kinds == kind):
          out[f"{split}_acc_{kind}"] = 100.0 * float(acc[kinds == kind].mean())
    return out


def write_results(results: Sequence[Mapping[str, Any]], path: str) -> None:
  """The EvalAI result file: a JSON list of {"question_id": int, "answer": str}."""
  with open(path, "w") as f:
    json.dump([{"question_id": int(r["question_id"]), "answer": str(r["answer"])}
               for r in results], f)


# --------------------------------------------------------------------------- task
def make_train_step(config, loaded: Loaded, tx, schedule):
  """Returns the pure `(state, batch) -> (state, metrics)` VQA fine-tuning step."""
  model, decoder = loaded.model, loaded.decoder
  momentum = loaded.model.config.momentum
  distill, question_only = bool(config.distill), bool(config.question_only)
  over_sequence = bool(config.compat.distill_over_sequence)

  def train_step(state: TrainState, batch):
    rng, k_m, k_online = jax.random.split(state.rng, 3)
    images = batch["image"]
    if question_only:
      images = jnp.zeros_like(images)
    q_ids, q_mask = batch["question_ids"], batch["question_mask"]
    a_ids, a_mask, weight = batch["answer_ids"], batch["answer_mask"], batch["answer_weight"]
    b, a, length = a_ids.shape
    flat_ids, flat_mask = a_ids.reshape(b * a, length), a_mask.reshape(b * a, length)
    alpha = distill_alpha(state.step, config)
    extras = dict(state.extras)
    logits_m = None
    if distill:   # as the official forward: momentum update, then the momentum logits
      extras["momentum"] = ema_update(extras["momentum"], state.params, momentum)
      logits_m = answer_logits(model, decoder, extras["momentum"], images, q_ids, q_mask,
                               a_ids, a_mask, rng=k_m)

    def loss_fn(params):
      logits = answer_logits(model, decoder, params, images, q_ids, q_mask, a_ids, a_mask,
                             rng=k_online)
      rows = answer_lm_loss(logits, logits_m, flat_ids, flat_mask, alpha, over_sequence)
      return weighted_loss(rows.reshape(b, a), weight), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new = state.apply_gradients(tx, grads, rng=rng)
    valid = flat_mask[:, 1:] * (weight.reshape(-1) > 0)[:, None]
    hits = (logits[:, :-1].argmax(-1) == flat_ids[:, 1:]) * valid
    token_acc = hits.sum() / jnp.maximum(valid.sum(), 1)
    metrics = dict(loss=loss, token_acc=token_acc, alpha=alpha, lr=schedule(state.step))
    return new.replace(extras=extras), metrics

  return train_step


def make_init(config, loaded: Loaded, tx):
  """rng -> TrainState: checkpoint encoders and decoder, momentum copies (boxed)."""
  abstract = jax.eval_shape(lambda k: init_params(loaded.model, k), jax.random.key(0))
  abstract = rt.retrieval_subset(abstract, ENCODERS, {**DROPPED, "bert": ("mlm_head",)})
  hidden = loaded.model.config.bert.hidden
  dummy = (jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32),
           jnp.zeros((1, 2, hidden), jnp.float32), jnp.ones((1, 2), jnp.int32))
  abstract["decoder"] = jax.eval_shape(
      lambda k: loaded.decoder.init(k, *dummy)["params"], jax.random.key(0))
  params = rt.place(abstract, loaded.params, f"{loaded.source} params")
  params_m = rt.place(abstract, loaded.params_m, f"{loaded.source} momentum params")

  def init(rng):
    extras = {"momentum": params_m} if config.distill else {}
    return TrainState.create(params=params, tx=tx, rng=rng, extras=extras)

  return init


def check_config(config) -> None:
  finetune.check_config(config)
  if int(config.k_test) < 1:
    raise ValueError(f"k_test {config.k_test} must be >= 1")


def make_task(config, mesh) -> Task:
  del mesh  # shardings come from the params' logical axis names
  check_config(config)
  answer_list = read_answer_list(config)
  loaded = load(config, answer_list)
  tx, schedule = optimizers.make_optimizer(config.optimizer, config.total_steps)
  train_source = make_source(config, "train", answer_list)
  majority = train_majority(train_source, int(config.majority_questions))
  splits, final = finetune.schedule(config)
  result_splits = tuple(config.eval.result_splits)
  sources = {s: make_source(config, s, answer_list)
             for s in dict.fromkeys(splits + final + result_splits)}
  evaluator = Evaluator(config, loaded, sources, majority)

  def evaluate(state):
    step = int(jax.device_get(state.step))
    return evaluator(state.params, finetune.splits_at(config, step), step)

  def finish(state, workdir):
    step = int(jax.device_get(state.step))
    for split in result_splits:
      if evaluator.results_step.get(split) != step:
        evaluator(state.params, (split,), step)
      if jax.process_index() == 0:
        write_results(evaluator.results[split], os.path.join(workdir, f"vqa_result_{split}.json"))

  def host_metrics():
    skipped = getattr(train_source, "skipped", {})
    return {f"skipped_{k}": float(v) for k, v in skipped.items()}

  return Task(init=make_init(config, loaded, tx),
              train_step=make_train_step(config, loaded, tx, schedule),
              train_data=make_train_iterator(config, loaded, train_source),
              evaluate=evaluate, finish=finish, host_metrics=host_metrics)
