"""SIMLA visual entailment: fine-tuning and accuracy (the official VE.py, models/simla/ve.py).

  python run.py --config=configs/simla_ve.py                       # shapes world
  python run.py --config=configs/simla_ve.py:snli_ve --config.init.checkpoint=CKPT ...

Model: the pretrained ViT and BERT (multimodal mode: the hypothesis cross-attends to
the image) and a new head on the multimodal [CLS]: Linear(hidden, hidden) -> ReLU ->
Linear(hidden, 3), classes contradiction / neutral / entailment (official ids 0 / 1 / 2).

Loss with momentum distillation (`distill=True`, as the official model): momentum
copies of the ViT, BERT and head, updated (EMA, `model.momentum`) before each use;
  loss = (1 - alpha) CE(logits, label) - alpha sum softmax(logits_m) log_softmax(logits)
with alpha ramped linearly from 0 over the first `alpha_warmup_steps` (-1: one epoch of
the training source, as the official epoch-0 ramp).

Initialisation (`init.checkpoint`): loaded by `simla_jax.tasks.retrieval.load_pretrained`
(a pretraining workdir, whose config.json defines the network, or an official .pth);
only the ViT and BERT are kept, the momentum copies start from the checkpoint's and
the head's momentum copy from the head. On the shapes world the hypotheses use words
the captions never do (entailment.vocabulary()); they get new word-embedding rows
(normal, `model.init_std`) after the checkpoint's, which keep their ids.

`text_only=True` zeroes every image (training and evaluation): the same network and
head without visual information, the baseline that shows what the image contributes.
Evaluation reports accuracy (%) per split, per hypothesis kind on the shapes world, and
the accuracy of always answering the training set's majority class.
"""

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from simla_jax import objectives as obj
from simla_jax.data import entailment
from simla_jax.data import pipeline
from simla_jax.data.tokenizer import Tokenizer, pre_caption
from simla_jax.models import SIMLA, ema_update, init_params
from simla_jax.models import layers
from simla_jax.tasks import finetune
from simla_jax.tasks import retrieval as rt
from train_jax import optimizers
from train_jax.state import TrainState
from train_jax.task import Task

NUM_CLASSES = len(entailment.LABELS)
VE_MODULES = ("vit", "bert")                        # kept of the pretrained SIMLA
MOMENTUM_MODULES = ("vit", "bert", "cls_head")      # official model_pairs


# --------------------------------------------------------------------------- model
class ClassifierHead(nn.Module):
  """(b, hidden) multimodal [CLS] -> (b, num_classes) logits; torch nn.Linear init."""
  hidden: int
  num_classes: int = NUM_CLASSES
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, cls_b_d: jax.Array) -> jax.Array:
    def dense(features, fan_in, names, name):
      return nn.Dense(features, dtype=self.dtype, param_dtype=jnp.float32, name=name,
                      kernel_init=layers.partitioned(layers.torch_linear_kernel_init(), names),
                      bias_init=layers.partitioned(layers.torch_linear_bias_init(fan_in),
                                                   names[1:]))
    x = nn.relu(dense(self.hidden, cls_b_d.shape[-1], ("embed", "mlp"), "dense_0")(cls_b_d))
    return dense(self.num_classes, self.hidden, ("mlp", None), "dense_1")(x).astype(jnp.float32)


def distill_loss(logits_b_c, logits_m_b_c, labels_b, alpha):
  """(1 - alpha) CE(logits, labels) + alpha CE(logits, softmax(logits_m)), batch mean."""
  one_hot = jax.nn.one_hot(labels_b, logits_b_c.shape[-1], dtype=jnp.float32)
  targets = (1 - alpha) * one_hot + alpha * jax.nn.softmax(
      jax.lax.stop_gradient(logits_m_b_c).astype(jnp.float32), -1)
  return obj.soft_cross_entropy(logits_b_c, targets).mean()


def classify(model: SIMLA, head: ClassifierHead, params, images, ids, mask, rng=None):
  """Entailment logits (b, 3) of (image, hypothesis) pairs; `rng` turns dropout on."""
  encoders = {k: params[k] for k in VE_MODULES}
  kw = lambda i: ({} if rng is None else
                  dict(deterministic=False, rngs={"dropout": jax.random.fold_in(rng, i)}))
  image_seq = model.apply({"params": encoders}, images, method=SIMLA.embed_image, **kw(0))
  fused = model.apply({"params": encoders}, ids, mask, image_seq, method=SIMLA.fuse,
                      cls_only=True, **kw(1))
  return head.apply({"params": params["cls_head"]}, fused[:, 0])


# --------------------------------------------------------------------------- loading
def make_tokenizer(data_cfg) -> tuple[Tokenizer, int]:
  """(tokenizer, size of the pretraining vocabulary it extends).

  A vocab_file is used as it is; the shapes world's built vocabulary gets the
  hypothesis words appended, so the pretraining ids are unchanged.
  """
  return pipeline.extended_tokenizer(data_cfg, entailment.vocabulary())


def grow_vocabulary(tree: Mapping[str, Any], base_size: int, vocab_size: int,
                    new_rows: np.ndarray | None) -> dict:
  """The BERT word table with `new_rows` appended when it holds exactly `base_size`
  words and the tokenizer has `vocab_size` (else unchanged: a mismatch is reported
  when the model is built)."""
  table = tree["bert"]["embeddings"]["word_embeddings"]["embedding"]
  if new_rows is None or table.shape[0] != base_size or vocab_size == base_size:
    return dict(tree)
  grown = np.concatenate([np.asarray(table), new_rows.astype(table.dtype)])
  embeddings = dict(tree["bert"]["embeddings"], word_embeddings={"embedding": grown})
  return dict(tree, bert=dict(tree["bert"], embeddings=embeddings))


@dataclasses.dataclass
class Loaded:
  model: SIMLA
  head: ClassifierHead
  tokenizer: Tokenizer
  params: dict        # vit, bert (numpy)
  params_m: dict      # their momentum copies
  source: str
  step: int


def load(config) -> Loaded:
  """The pretrained encoders for VE, with the tokenizer and the network they fit."""
  pretrained = rt.load_pretrained(config)
  tokenizer, base_size = make_tokenizer(config.data)
  params = rt.retrieval_subset(pretrained.params, VE_MODULES)
  params_m = rt.retrieval_subset(pretrained.params_m or pretrained.params, VE_MODULES)
  hidden = params["bert"]["embeddings"]["word_embeddings"]["embedding"].shape[1]
  n_new = tokenizer.vocab_size - base_size
  new_rows = (np.random.default_rng(int(config.seed)).normal(
      0.0, float(pretrained.model_config.init_std), (n_new, hidden)) if n_new > 0 else None)
  params = grow_vocabulary(params, base_size, tokenizer.vocab_size, new_rows)
  params_m = grow_vocabulary(params_m, base_size, tokenizer.vocab_size, new_rows)
  model_cfg = rt.resolve_model_config(pretrained.model_config, tokenizer, params)
  head = ClassifierHead(hidden=model_cfg.bert.hidden, dtype=jnp.dtype(model_cfg.dtype))
  return Loaded(SIMLA(model_cfg), head, tokenizer, params, params_m, pretrained.source,
                pretrained.step)


# --------------------------------------------------------------------------- data
def make_source(config, split: str):
  """Shapes-world hypotheses or an official VE file for `split` (train / val / test)."""
  d = config.data
  if d.name == "shapes":
    return entailment.ShapesEntailment(
        d, split, int(config.train_images) if split == "train" else None)
  if d.name == "snli_ve":
    path = d.ve.files.get(split, "")
    if not path:
      raise ValueError(f"data.ve.files.{split}: the official VE JSON of the {split!r} split "
                       f"is required")
    return entailment.VeJsonSource(path, d.ve.image_root, check_images=bool(d.ve.check_images))
  raise ValueError(f"data.name: {d.name!r} is not a VE dataset (shapes | snli_ve)")


class ExampleTransform(pipeline.TaskTransform):
  """(stream position k, example) -> image, text_ids, text_mask, label, kind, index.

  Training draws the augmentation from default_rng([seed, epoch, index]); a flipped
  image has left / right swapped in its hypothesis (`aug.flip_swap`).
  """

  def map_with_index(self, k: int, ex: dict) -> dict:
    index = int(ex["index"])
    image, text = self.image_and_text(k, index, ex["image"],
                                      pre_caption(ex["hypothesis"], self.max_words))
    ids, mask = self.tokenizer(text)
    kind = entailment.KINDS.index(ex["kind"]) if ex["kind"] else -1
    return {"image": image, "text_ids": ids, "text_mask": mask,
            "label": np.int32(ex["label"]), "kind": np.int32(kind), "index": np.int32(index)}


def make_train_iterator(config, tokenizer: Tokenizer, source) -> grain.DatasetIterator:
  """This process's shard, reshuffled every epoch, repeated, augmented, batched."""
  d = config.data
  return pipeline.task_train_iterator(
      d, source, int(config.batch_size) // jax.process_count(),
      lambda n: ExampleTransform(d, tokenizer, seed=int(d.seed), epoch_length=n, train=True),
      "ve")


# --------------------------------------------------------------------------- evaluation
class Evaluator:
  """Accuracy (%) of a split's examples; see `__call__` for the names it returns."""

  def __init__(self, config, loaded: Loaded, sources: Mapping[str, Any], majority: int):
    self.sources = dict(sources)
    self.majority = int(majority)
    self.batch_size = int(config.eval.batch_size)
    self.threads = int(config.data.loader.num_threads)
    self.transform = ExampleTransform(config.data, loaded.tokenizer, seed=0, epoch_length=1,
                                      train=False)
    text_only = bool(config.text_only)

    @jax.jit
    def predict(params, images, ids, mask):
      if text_only:
        images = jnp.zeros_like(images)
      return classify(loaded.model, loaded.head, params, images, ids, mask).argmax(-1)
    self._predict = predict

  def predictions(self, params, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted, label, kind) int arrays over the split, in source order."""
    preds, labels, kinds = [], [], []
    split_batches = finetune.batches(self.sources[split], self.transform, self.batch_size,
                                     self.threads)
    for b, p in finetune.predict(functools.partial(self._predict, params), split_batches,
                                 self.batch_size, ("image", "text_ids", "text_mask")):
      preds.append(p)
      labels.append(b["label"])
      kinds.append(b["kind"])
    return np.concatenate(preds), np.concatenate(labels), np.concatenate(kinds)

  def __call__(self, params, splits: Sequence[str]) -> dict[str, float]:
    """<split>_acc, <split>_acc_<kind> (shapes), <split>_majority_acc, in percent."""
    out = {}
    for split in splits:
      pred, label, kind = self.predictions(params, split)
      out.update(finetune.accuracies(split, pred, label, kind, entailment.KINDS, self.majority))
    return out


# --------------------------------------------------------------------------- task
def alpha_warmup_steps(config, num_train: int) -> int:
  """Steps of the distillation ramp: `config.alpha_warmup_steps`, or with -1 the steps
  of one epoch over `num_train` training examples (the official ramp over epoch 0)."""
  steps = int(config.alpha_warmup_steps)
  if steps == -1:
    return max(int(num_train) // int(config.batch_size), 1)
  if steps < 0:
    raise ValueError(f"alpha_warmup_steps {steps}: -1 (one epoch) or >= 0")
  return steps


def make_train_step(config, loaded: Loaded, tx, schedule, warmup_steps: int):
  """Returns the pure `(state, batch) -> (state, metrics)` VE fine-tuning step;
  `warmup_steps`: the distillation ramp (`alpha_warmup_steps`)."""
  model, head = loaded.model, loaded.head
  momentum = loaded.model.config.momentum
  distill, text_only = bool(config.distill), bool(config.text_only)

  def train_step(state: TrainState, batch):
    rng, k_m, k_online = jax.random.split(state.rng, 3)
    images, ids, mask, labels = (batch["image"], batch["text_ids"], batch["text_mask"],
                                 batch["label"])
    if text_only:
      images = jnp.zeros_like(images)
    alpha = obj.alpha_at(state.step, config.alpha, warmup_steps)
    extras = dict(state.extras)
    if distill:   # as the official forward: momentum update, then the momentum prediction
      extras["momentum"] = ema_update(extras["momentum"], state.params, momentum)
      logits_m = classify(model, head, extras["momentum"], images, ids, mask, rng=k_m)

    def loss_fn(params):
      logits = classify(model, head, params, images, ids, mask, rng=k_online)
      if distill:
        loss = distill_loss(logits, logits_m, labels, alpha)
      else:
        loss = distill_loss(logits, logits, labels, 0.0)
      return loss, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new = state.apply_gradients(tx, grads, rng=rng)
    acc = jnp.mean((logits.argmax(-1) == labels).astype(jnp.float32))
    metrics = dict(loss=loss, acc=acc, alpha=alpha, lr=schedule(state.step))
    return new.replace(extras=extras), metrics

  return train_step


def make_init(config, loaded: Loaded, tx):
  """rng -> TrainState: checkpoint encoders, a new head, momentum copies (boxed)."""
  abstract = jax.eval_shape(lambda k: init_params(loaded.model, k), jax.random.key(0))
  abstract = rt.retrieval_subset(abstract, VE_MODULES)
  params = rt.place(abstract, loaded.params, f"{loaded.source} params")
  params_m = rt.place(abstract, loaded.params_m, f"{loaded.source} momentum params")
  hidden = loaded.model.config.bert.hidden

  def init(rng):
    k_head, k_state = jax.random.split(rng)
    head = loaded.head.init(k_head, jnp.zeros((1, hidden), jnp.float32))["params"]
    extras = {}
    if config.distill:   # the head's momentum copy starts as the head (copy_params)
      extras["momentum"] = dict(params_m, cls_head=head)
    return TrainState.create(params=dict(params, cls_head=head), tx=tx, rng=k_state,
                             extras=extras)

  return init


def check_config(config) -> None:
  finetune.check_config(config)
  if int(config.alpha_warmup_steps) < -1:
    raise ValueError(f"alpha_warmup_steps {config.alpha_warmup_steps}: -1 (one epoch) or >= 0")


def make_task(config, mesh) -> Task:
  del mesh  # shardings come from the params' logical axis names
  check_config(config)
  loaded = load(config)
  tx, schedule = optimizers.make_optimizer(config.optimizer, config.total_steps)
  train_source = make_source(config, "train")
  majority = int(np.bincount(train_source.labels, minlength=NUM_CLASSES).argmax())
  splits, final = finetune.schedule(config)
  evaluator = Evaluator(config, loaded, {s: make_source(config, s) for s in splits + final},
                        majority)

  def evaluate(state):
    return evaluator(state.params, finetune.splits_at(config, jax.device_get(state.step)))

  return Task(init=make_init(config, loaded, tx),
              train_step=make_train_step(config, loaded, tx, schedule,
                                         alpha_warmup_steps(config, len(train_source))),
              train_data=make_train_iterator(config, loaded.tokenizer, train_source),
              evaluate=evaluate)
