"""SIMLA NLVR2: text-assignment pretraining and fine-tuning (official Pretrain_NLVR.py,
NLVR.py, models/simla/{pretrain_nlvr,nlvr}.py).

  python run.py --config=configs/simla_nlvr_pretrain.py    # family simla_nlvr_pretrain
  python run.py --config=configs/simla_nlvr.py             # family simla_nlvr

Network: the pretrained ViT and the two-image BERT of `simla_jax.models.nlvr_encoder`
(the pretrained layers rebuilt with the upper ones duplicated, layer i cross-attending
image i mod 2, key / value shared within each duplicated pair).

Text-assignment pretraining (family `simla_nlvr_pretrain`) on image-caption batches: the
image-image similarity sim = f f^T / 0.07 of the (frozen) pretrained vision_proj features
f, softmax over each row, diagonal zeroed, gives each caption b its negatives. With
probability 2/3 caption b gets its image and one negative drawn from row b, its image
on the left (label 0) or right (label 1) with equal odds; else two distinct negatives
(label 2, matches neither). Loss: cross-entropy of `ta_head` (Linear(hidden, 3)) on
[CLS]. vision_proj only scores similarities, under no_grad in the official code: it is
kept frozen in `extras`.

Fine-tuning (family `simla_nlvr`): head Linear(hidden, hidden) -> ReLU -> Linear(hidden,
2) on [CLS] (labels False 0 / True 1); momentum distillation as VE (ve.distill_loss, the
official formula). Starts from `init.checkpoint`: a text-assignment workdir (the default,
as the official), or a pretraining workdir / official .pth (the encoder is then built
from it directly). The momentum copies start from the loaded encoders and the new head
(the official NLVR.py calls copy_params() *before* loading the checkpoint, so its
momentum model starts from bert-base-uncased and a random ViT; not reproduced).
`text_only=True` zeroes both images (the statement-only baseline). Evaluation reports
accuracy (%) per split, per statement kind on the shapes world, and the training
majority class's accuracy.
"""

import dataclasses
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simla_jax import convert
from simla_jax import objectives as obj
from simla_jax.data import nlvr as nlvr_data
from simla_jax.data import nlvr_shapes
from simla_jax.data import pipeline
from simla_jax.data.tokenizer import Tokenizer, pre_caption
from simla_jax.models import SIMLA, ema_update, init_params
from simla_jax.models import layers
from simla_jax.models import nlvr_encoder
from simla_jax.tasks import finetune
from simla_jax.tasks import retrieval as rt
from simla_jax.tasks import ve
from train_jax import optimizers
from train_jax.state import TrainState
from train_jax.task import Task

NUM_CLASSES = {"simla_nlvr_pretrain": 3, "simla_nlvr": 2}
HEAD = {"simla_nlvr_pretrain": "ta_head", "simla_nlvr": "cls_head"}
SIM_TEMP = 0.07            # the official fixed temperature of the negatives' similarity


# --------------------------------------------------------------------------- model
class TaHead(nn.Module):
  """(b, hidden) [CLS] -> (b, 3) text-assignment logits (official ta_head: one Linear)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, cls_b_d: jax.Array) -> jax.Array:
    return nn.Dense(3, dtype=self.dtype, param_dtype=jnp.float32, name="dense",
                    kernel_init=layers.partitioned(layers.torch_linear_kernel_init(),
                                                   ("embed", None)),
                    bias_init=layers.partitioned(
                        layers.torch_linear_bias_init(cls_b_d.shape[-1]), (None,)))(
                            cls_b_d).astype(jnp.float32)


@dataclasses.dataclass
class Net:
  """The ViT (through SIMLA), the two-image BERT and the head of one family."""
  simla: SIMLA
  bert: nlvr_encoder.NlvrBert
  head: nn.Module

  def images(self, params, images, rng=None):
    kw = {} if rng is None else dict(deterministic=False, rngs={"dropout": rng})
    return self.simla.apply({"params": {"vit": params["vit"]}}, images,
                            method=SIMLA.embed_image, **kw)

  def cls(self, params, ids, mask, image0_seq, image1_seq, rng=None):
    """The two-image BERT's [CLS] (b, hidden)."""
    out = self.bert.apply(params["bert"], ids, mask, image0_seq, image1_seq,
                          deterministic=rng is None, rng=rng)
    return out[:, 0]

  def logits(self, params, head_name, ids, mask, image0, image1, rng=None):
    """(b, H, W, 3) image pairs and their texts -> head logits."""
    r = [None] * 3 if rng is None else list(jax.random.split(rng, 3))
    seq = self.images(params, jnp.concatenate([image0, image1]), r[0])
    seq0, seq1 = jnp.split(seq, 2)
    return self.head.apply({"params": params[head_name]},
                           self.cls(params, ids, mask, seq0, seq1, r[1]))


def text_assignment(rng: jax.Array, image_feat_b_e: jax.Array,
                    temp: float = SIM_TEMP) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(left index (b,), right index (b,), label (b,)) of the official assignment.

  Text b: label 0 -> (b, n), label 1 -> (n, b), label 2 -> (n1, n2), the negatives n,
  n1 != n2 drawn from softmax(sim[b] / temp) with the diagonal zeroed (two without
  replacement: Gumbel top-2, the law of torch.multinomial's sequential draws)."""
  b = image_feat_b_e.shape[0]
  k_case, k_side, k_neg = jax.random.split(rng, 3)
  sim = jax.lax.stop_gradient(image_feat_b_e @ image_feat_b_e.T).astype(jnp.float32) / temp
  logp = jax.nn.log_softmax(sim, axis=-1)
  logp = jnp.where(jnp.eye(b, dtype=bool), -jnp.inf, logp)
  gumbel = jax.random.gumbel(k_neg, logp.shape)
  neg = jax.lax.top_k(logp + gumbel, 2)[1]                         # (b, 2)
  has_pos = jax.random.uniform(k_case, (b,)) > 1 / 3
  left_pos = jax.random.uniform(k_side, (b,)) > 0.5
  own = jnp.arange(b)
  label = jnp.where(has_pos, jnp.where(left_pos, 0, 1), 2)
  left = jnp.where(label == 0, own, neg[:, 0])
  right = jnp.where(label == 0, neg[:, 0], jnp.where(label == 1, own, neg[:, 1]))
  return left, right, label.astype(jnp.int32)


# --------------------------------------------------------------------------- loading
def make_tokenizer(data_cfg) -> tuple[Tokenizer, int]:
  """(tokenizer, size of the pretraining vocabulary): the shapes vocabulary gets the
  statement words appended (pretraining ids unchanged); a vocab_file is used as is."""
  return pipeline.extended_tokenizer(data_cfg, nlvr_shapes.vocabulary())


@dataclasses.dataclass
class Loaded:
  net: Net
  tokenizer: Tokenizer
  params: dict          # vit, bert (NLVR layout), [vision_proj]; numpy
  params_m: dict        # the encoders' momentum copies
  source: str


def _bert_per_layer(tree: Mapping[str, Any], model_cfg) -> dict:
  """A SIMLA params tree's BERT in the per-layer layout (scanned trees are unstacked)."""
  unstacked = convert.unstack_layers({"bert": tree["bert"]}, model_cfg)
  return unstacked["bert"]


def _from_simla(tree: Mapping[str, Any], model_cfg, duplicate_from: int) -> dict:
  out = {"vit": tree["vit"]}
  cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  out["bert"] = nlvr_encoder.from_pretrained_bert(
      _bert_per_layer(tree, cfg), int(cfg.bert.layers), duplicate_from)
  if "vision_proj" in tree:
    out["vision_proj"] = tree["vision_proj"]
  return out


def load(config) -> Loaded:
  """The encoders for `config.family` from `config.init.checkpoint` (see module doc)."""
  path = config.init.checkpoint
  tokenizer, base_size = make_tokenizer(config.data)
  run = rt.read_run_config(path) if os.path.isdir(path) else None
  d = int(config.nlvr.duplicate_from)
  if run is not None and run.get("family") == "simla_nlvr_pretrain":
    # A text-assignment run: its encoders are already in the NLVR layout.
    base = run["init"]["checkpoint"]
    model_cfg = (rt.workdir_model_config(base) if os.path.isdir(base)
                 else ml_collections.ConfigDict(run["model"]))
    model_cfg = rt.retrieval_model_overrides(model_cfg, config)
    d = int(run["nlvr"]["duplicate_from"])
    state, _ = rt._restore_state(os.path.join(path, "checkpoints"))  # pylint: disable=protected-access
    params = {k: state["params"][k] for k in ("vit", "bert")}
    params_m = params
    grid = model_cfg.image_size // model_cfg.patch_size
    if params["vit"]["pos_embed"].shape[1] != 1 + grid ** 2:
      raise ValueError(f"{path}: a text-assignment run at another image size; set "
                       f"data.image_size to its {run['data']['image_size']}")
  else:
    pretrained = rt.load_pretrained(config)
    model_cfg = pretrained.model_config
    src = rt.retrieval_subset(pretrained.params, ("vit", "bert", "vision_proj"))
    src_m = rt.retrieval_subset(pretrained.params_m or pretrained.params, ("vit", "bert"))
    n_new = tokenizer.vocab_size - base_size
    hidden = src["bert"]["embeddings"]["word_embeddings"]["embedding"].shape[1]
    new_rows = (np.random.default_rng(int(config.seed)).normal(
        0.0, float(model_cfg.init_std), (n_new, hidden)) if n_new > 0 else None)
    src = ve.grow_vocabulary(src, base_size, tokenizer.vocab_size, new_rows)
    src_m = ve.grow_vocabulary(src_m, base_size, tokenizer.vocab_size, new_rows)
    d = nlvr_encoder.default_duplicate_from(int(model_cfg.bert.layers)) if d < 0 else d
    params = _from_simla(src, model_cfg, d)
    params_m = _from_simla(src_m, model_cfg, d)
    # The official fine-tuning model keeps the momentum copies of vit / bert only.
    params_m = {k: params_m[k] for k in ("vit", "bert")}
    if config.family == "simla_nlvr":
      params.pop("vision_proj", None)
  words = params["bert"]["embeddings"]["word_embeddings"]["embedding"].shape[0]
  if words != tokenizer.vocab_size:
    raise ValueError(f"{path}: the checkpoint's vocabulary has {words} words, the tokenizer "
                     f"of config.data {tokenizer.vocab_size}")
  model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  model_cfg.bert.vocab_size = tokenizer.vocab_size
  if model_cfg.codebook_size == -1:
    model_cfg.codebook_size = 1
  bert = nlvr_encoder.NlvrBert.from_model_config(model_cfg, d)
  dtype = jnp.dtype(model_cfg.dtype)
  head = (TaHead(dtype=dtype) if config.family == "simla_nlvr_pretrain" else
          ve.ClassifierHead(hidden=int(model_cfg.bert.hidden), num_classes=2, dtype=dtype))
  return Loaded(Net(SIMLA(model_cfg), bert, head), tokenizer, params, params_m, path)


# --------------------------------------------------------------------------- data
def make_source(config, split: str):
  """Shapes-world statements or official NLVR2 files for `split` (train / val / test)."""
  d = config.data
  if d.name == "shapes":
    return nlvr_shapes.ShapesNlvr(d, split, int(config.train_pairs) if split == "train"
                                  else None)
  if d.name == "nlvr2":
    files = d.nlvr.files.get(split, ())
    if not files:
      raise ValueError(f"data.nlvr.files.{split}: the official NLVR2 JSON of the {split!r} "
                       f"split is required")
    return nlvr_data.NlvrJsonSource(list(files) if not isinstance(files, str) else files,
                                    d.nlvr.image_root, check_images=bool(d.nlvr.check_images),
                                    skip_bad=bool(d.nlvr.skip_bad))
  raise ValueError(f"data.name: {d.name!r} is not an NLVR2 dataset (shapes | nlvr2)")


class ExampleTransform(pipeline.TaskTransform):
  """(stream position k, example) -> image0, image1, text_ids, text_mask, label, kind, index.

  Training augments each image with its own draw of default_rng([seed, epoch, index, side])
  (the official dataset transforms the two images independently)."""

  def map_with_index(self, k: int, ex: dict) -> dict:
    index = int(ex["index"])
    out = {}
    for side in (0, 1):
      out[f"image{side}"], _ = self.image(k, index, ex[f"image{side}"], side)
    ids, mask = self.tokenizer(pre_caption(ex["sentence"], self.max_words))
    kind = nlvr_shapes.KINDS.index(ex["kind"]) if ex["kind"] else -1
    return dict(out, text_ids=ids, text_mask=mask, label=np.int32(ex["label"]),
                kind=np.int32(kind), index=np.int32(index))


def make_train_iterator(config, tokenizer: Tokenizer) -> grain.DatasetIterator:
  """This process's shard, reshuffled every epoch, repeated, augmented, batched."""
  d = config.data
  batch_size = int(config.batch_size) // jax.process_count()
  if config.family == "simla_nlvr_pretrain":   # image-caption pairs, as the pretraining reads
    return pipeline.make_train_iterator(d, batch_size=batch_size, tokenizer=tokenizer)
  return pipeline.task_train_iterator(
      d, make_source(config, "train"), batch_size,
      lambda n: ExampleTransform(d, tokenizer, seed=int(d.seed), epoch_length=n, train=True),
      "nlvr")


# --------------------------------------------------------------------------- evaluation
class Evaluator:
  """Fine-tuning: accuracy (%) per split (and kind); text assignment: accuracy of the
  3-way assignment over fixed draws on the split's image-caption batches."""

  def __init__(self, config, loaded: Loaded, sources: Mapping[str, Any], majority: int):
    self.family = config.family
    self.sources, self.majority = dict(sources), int(majority)
    self.batch_size = int(config.eval.batch_size)
    self.threads = int(config.data.loader.num_threads)
    net, head_name, text_only = loaded.net, HEAD[config.family], bool(config.text_only)
    if self.family == "simla_nlvr_pretrain":
      self.transform = pipeline.ExampleTransform(config.data, loaded.tokenizer, seed=0,
                                                 epoch_length=1, train=False)

      @jax.jit
      def predict(params, extras, batch, rng):
        seq = net.images(params, batch["image"])
        feat = net.simla.apply({"params": {"vision_proj": extras["vision_proj"]}}, seq,
                               method=SIMLA.image_feature)
        left, right, label = text_assignment(rng, feat)
        logits = net.head.apply({"params": params[head_name]},
                                net.cls(params, batch["text_ids"], batch["text_mask"],
                                        seq[left], seq[right]))
        return logits.argmax(-1), label
    else:
      self.transform = ExampleTransform(config.data, loaded.tokenizer, seed=0, epoch_length=1,
                                        train=False)

      @jax.jit
      def predict(params, extras, batch, rng):
        del extras, rng
        i0, i1 = batch["image0"], batch["image1"]
        if text_only:
          i0, i1 = jnp.zeros_like(i0), jnp.zeros_like(i1)
        return net.logits(params, head_name, batch["text_ids"], batch["text_mask"], i0,
                          i1).argmax(-1), batch["label"]
    self._predict = predict

  def __call__(self, params, extras, splits: Sequence[str]) -> dict[str, float]:
    out = {}
    for split in splits:
      preds, labels, kinds = [], [], []
      split_batches = finetune.batches(self.sources[split], self.transform, self.batch_size,
                                       self.threads)
      for k, b in enumerate(split_batches):
        inputs = [n for n in ("text_ids", "text_mask", "image", "image0", "image1", "label")
                  if n in b]
        padded, n = finetune.padded(b, self.batch_size, inputs)
        if self.family == "simla_nlvr_pretrain" and n < self.batch_size:
          break   # negatives come from the batch: only whole batches
        p, label = self._predict(params, extras, padded, jax.random.key(k))
        preds.append(np.asarray(p)[:n])
        labels.append(np.asarray(label)[:n])
        kinds.append(b.get("kind", np.full(n, -1)))
      pred, label, kind = map(np.concatenate, (preds, labels, kinds))
      if self.family == "simla_nlvr_pretrain":
        out[f"{split}_ta_acc"] = 100.0 * float(np.mean(pred == label))
        continue
      out.update(finetune.accuracies(split, pred, label, kind, nlvr_shapes.KINDS,
                                     self.majority))
    return out


# --------------------------------------------------------------------------- task
def pair_loss(logits_b_c, logits_m_b_c, labels_b, alpha, distill: bool):
  """Fine-tuning loss: the official (1 - alpha) CE + alpha soft CE to the momentum
  prediction with distillation, plain CE without."""
  if distill:
    return ve.distill_loss(logits_b_c, logits_m_b_c, labels_b, alpha)
  return ve.distill_loss(logits_b_c, logits_b_c, labels_b, 0.0)


def make_train_step(config, loaded: Loaded, tx, schedule):
  """The pure `(state, batch) -> (state, metrics)` step of either family."""
  net, head_name = loaded.net, HEAD[config.family]
  momentum = float(net.simla.config.momentum)
  distill, text_only = bool(config.get("distill", False)), bool(config.get("text_only", False))

  def ta_step(state: TrainState, batch):
    rng, k_assign, k_drop = jax.random.split(state.rng, 3)
    k_vit, k_bert = jax.random.split(k_drop)
    frozen = state.extras["vision_proj"]

    def loss_fn(params):
      seq = net.images(params, batch["image"], k_vit)
      feat = net.simla.apply({"params": {"vision_proj": frozen}}, seq,
                             method=SIMLA.image_feature)
      left, right, label = text_assignment(k_assign, feat)
      logits = net.head.apply({"params": params[head_name]},
                              net.cls(params, batch["text_ids"], batch["text_mask"],
                                      seq[left], seq[right], k_bert))
      one_hot = jax.nn.one_hot(label, NUM_CLASSES["simla_nlvr_pretrain"], dtype=jnp.float32)
      return obj.soft_cross_entropy(logits, one_hot).mean(), (logits, label)

    (loss, (logits, label)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new = state.apply_gradients(tx, grads, rng=rng)
    acc = jnp.mean((logits.argmax(-1) == label).astype(jnp.float32))
    return new, dict(loss=loss, acc=acc, lr=schedule(state.step))

  def nlvr_step(state: TrainState, batch):
    rng, k_m, k_online = jax.random.split(state.rng, 3)
    i0, i1, ids, mask, labels = (batch["image0"], batch["image1"], batch["text_ids"],
                                 batch["text_mask"], batch["label"])
    if text_only:
      i0, i1 = jnp.zeros_like(i0), jnp.zeros_like(i1)
    alpha = obj.alpha_at(state.step, config.alpha, config.alpha_warmup_steps)
    extras = dict(state.extras)
    logits_m = None
    if distill:   # as the official forward: momentum update, then the momentum prediction
      extras["momentum"] = ema_update(extras["momentum"], state.params, momentum)
      logits_m = net.logits(extras["momentum"], head_name, ids, mask, i0, i1, rng=k_m)

    def loss_fn(params):
      logits = net.logits(params, head_name, ids, mask, i0, i1, rng=k_online)
      return pair_loss(logits, logits_m, labels, alpha, distill), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new = state.apply_gradients(tx, grads, rng=rng)
    acc = jnp.mean((logits.argmax(-1) == labels).astype(jnp.float32))
    return new.replace(extras=extras), dict(loss=loss, acc=acc, alpha=alpha,
                                            lr=schedule(state.step))

  return ta_step if config.family == "simla_nlvr_pretrain" else nlvr_step


def make_init(config, loaded: Loaded, tx):
  """rng -> TrainState: loaded encoders, a new head, extras (boxed)."""
  net, head_name = loaded.net, HEAD[config.family]
  abstract_simla = jax.eval_shape(lambda k: init_params(net.simla, k), jax.random.key(0))
  width = int(net.simla.config.vit.width)
  abstract = {"vit": abstract_simla["vit"],
              "bert": jax.eval_shape(lambda k: net.bert.init(k, width), jax.random.key(0))}
  params = rt.place(abstract, {k: loaded.params[k] for k in ("vit", "bert")},
                    f"{loaded.source} params")
  params_m = rt.place(abstract, loaded.params_m, f"{loaded.source} momentum params")
  vision_proj = None
  if config.family == "simla_nlvr_pretrain":
    if "vision_proj" not in loaded.params:
      raise ValueError(f"{loaded.source}: text assignment needs the pretrained vision_proj")
    vision_proj = rt.place(abstract_simla["vision_proj"], loaded.params["vision_proj"],
                           f"{loaded.source} vision_proj")
  hidden = net.bert.hidden

  def init(rng):
    k_head, k_state = jax.random.split(rng)
    head = net.head.init(k_head, jnp.zeros((1, hidden), jnp.float32))["params"]
    extras = {}
    if vision_proj is not None:
      extras["vision_proj"] = vision_proj
    if config.get("distill", False):   # the head's momentum copy starts as the head
      extras["momentum"] = dict(params_m, **{head_name: head})
    return TrainState.create(params=dict(params, **{head_name: head}), tx=tx, rng=k_state,
                             extras=extras)

  return init


def check_config(config) -> None:
  if config.family not in NUM_CLASSES:
    raise ValueError(f"nlvr: family {config.family!r} is not one of {sorted(NUM_CLASSES)}")
  finetune.check_config(config)
  if config.family == "simla_nlvr_pretrain" and config.batch_size // jax.process_count() < 3:
    raise ValueError("text assignment draws two negatives from the batch: batch_size >= 3 "
                     "per process")


def make_task(config, mesh) -> Task:
  del mesh  # shardings come from the params' logical axis names
  check_config(config)
  loaded = load(config)
  tx, schedule = optimizers.make_optimizer(config.optimizer, config.total_steps)
  splits, final = finetune.schedule(config)
  if config.family == "simla_nlvr_pretrain":
    sources = {s: pipeline.make_source(config.data, s) for s in splits + final}
    majority = 2
  else:
    train = make_source(config, "train")
    majority = int(np.bincount(train.labels, minlength=2).argmax())
    sources = {s: make_source(config, s) for s in splits + final}
  evaluator = Evaluator(config, loaded, sources, majority)

  def evaluate(state):
    return evaluator(state.params, state.extras,
                     finetune.splits_at(config, jax.device_get(state.step)))

  return Task(init=make_init(config, loaded, tx),
              train_step=make_train_step(config, loaded, tx, schedule),
              train_data=make_train_iterator(config, loaded.tokenizer),
              evaluate=evaluate)
