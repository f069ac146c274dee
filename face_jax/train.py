"""The MvCoM face-recognition task for the generic loop: `make_task(config, mesh)`.

Methods (config.method), all with the same model, data, step and evaluation code:
  plain                CosFace / ArcFace with the base margin m0 (config.loss)
  fixed_group_margins  m_i = m0 + config.fixed_group_margins[group_i]
  mvcom                m_i from the additive margin model (face_jax/mvcom.py), whose
                       parameters are meta-learned through a virtual SGD step on the
                       held-out balanced meta set (face_jax/meta.py)
  l2rw                 m0, and per-sample loss weights from learning-to-reweight
Group-balanced sampling is `config.data.sampling = "group_balanced"`.

State: params = model parameters (backbone, classifier, attribute heads); extras =
{"batch_stats": BatchNorm statistics, "margin": margin-model parameters,
"margin_opt": their Adam state}. A step of `mvcom`:
  1. every `meta_every` steps: phi <- Adam(grad_phi L_meta(theta - lr * grad_theta
     L_train(theta, phi))), lr = the current learning rate; the virtual passes use batch
     statistics and their BatchNorm updates are discarded;
  2. the real step on theta with the margins m(phi) just updated, which alone writes the
     BatchNorm statistics.
"""

import functools
import json
import os
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from face_jax import evaluate as evaluate_lib
from face_jax import margins as margins_lib
from face_jax import meta as meta_lib
from face_jax import mvcom as mvcom_lib
from face_jax import plots
from face_jax.data import sampling
from face_jax.data import synthetic
from face_jax.models import iresnet
from face_jax.models.face import FaceModel
from train_jax import sharding
from train_jax.state import TrainState
from train_jax.task import Task

METHODS = ("plain", "fixed_group_margins", "mvcom", "l2rw")
SLOTS = ("m1", "m2", "m3")


# --- model ------------------------------------------------------------------------------

def build_model(config, num_classes: int) -> FaceModel:
  m = config.model
  kwargs = dict(widths=tuple(m.widths), embed_dim=m.embed_dim, dropout=m.dropout,
                dtype=jnp.dtype(m.dtype), remat=m.remat, scan_layers=m.scan_layers)
  backbone = (iresnet.iresnet(m.arch, **kwargs) if m.arch
              else iresnet.IResNet(layers=tuple(m.layers), **kwargs))
  heads = (sum(n for _, n in config.mvcom.factors)
           if config.method == "mvcom" and config.mvcom.attributes == "predicted" else 0)
  return FaceModel(backbone=backbone, num_classes=num_classes, attribute_dims=heads)


def check_config(config) -> None:
  if config.method not in METHODS:
    raise ValueError(f"config.method={config.method!r}; known: {', '.join(METHODS)}")
  if config.loss.margin_slot not in SLOTS:
    raise ValueError(f"config.loss.margin_slot={config.loss.margin_slot!r}; known: {SLOTS}")
  if config.mvcom.attributes not in ("oracle", "predicted"):
    raise ValueError(f"config.mvcom.attributes={config.mvcom.attributes!r}; known: oracle, predicted")
  if config.data.sampling not in ("uniform", "group_balanced"):
    raise ValueError(f"config.data.sampling={config.data.sampling!r}; known: uniform, group_balanced")
  if config.mvcom.meta_every < 1:
    raise ValueError("config.mvcom.meta_every must be >= 1")


def uses_meta_batch(config) -> bool:
  return config.method in ("mvcom", "l2rw")


# --- losses and steps -------------------------------------------------------------------

class Steps:
  """The pure functions of the task, built once from the config.

  Attributes set in __init__: model, margin_model, tx, schedule, meta_tx.
  """

  def __init__(self, config, model: FaceModel, tx: optax.GradientTransformation,
               schedule: Callable[[Any], Any]):
    check_config(config)
    self.config, self.model, self.tx, self.schedule = config, model, tx, schedule
    self.factors = tuple((str(n), int(k)) for n, k in config.mvcom.factors)
    self.m0 = float(config.loss[config.loss.margin_slot])
    self.margin_model = mvcom_lib.AdditiveMargin(
        self.factors, base=self.m0, bound=config.mvcom.bound, class_bound=config.mvcom.class_bound)
    self.meta_tx = optax.adamw(config.mvcom.meta_lr, weight_decay=config.mvcom.meta_weight_decay)

  # -- init --

  def init(self, rng, image_shape) -> TrainState:
    """rng -> TrainState with boxed (logically partitioned) params."""
    init_rng, state_rng = jax.random.split(rng)
    variables = self.model.init({"params": init_rng, "dropout": init_rng},
                                jnp.zeros((2, *image_shape), jnp.float32), train=False)
    extras = {"batch_stats": variables["batch_stats"]}
    if self.config.method == "mvcom":
      attrs = {n: jnp.zeros((1, k), jnp.float32) for n, k in self.factors}
      phi = self.margin_model.init(jax.random.key(0), attrs, jnp.zeros((1,)))["params"]
      extras.update(margin=phi, margin_opt=self.meta_tx.init(phi))
    return TrainState.create(params=variables["params"], tx=self.tx, rng=state_rng, extras=extras)

  # -- pieces --

  def forward(self, params, batch_stats, images, rng):
    """Training-mode forward: (cos (b, c), attribute logits or None, new batch_stats)."""
    (_, cos, attr), mutated = self.model.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True,
        mutable=["batch_stats"], rngs={"dropout": rng})
    return cos, attr, mutated["batch_stats"]

  def logits(self, cos, labels, margin):
    cfg = self.config.loss
    slots = {k: float(cfg[k]) for k in SLOTS}
    slots[cfg.margin_slot] = margin
    return margins_lib.margin_logits(cos, labels, s=cfg.s, straight_through=cfg.straight_through,
                                     **slots)

  def attributes(self, batch, attr_logits, prefix=""):
    if self.config.mvcom.attributes == "predicted":
      return mvcom_lib.predicted_attributes(attr_logits, self.factors)
    return mvcom_lib.oracle_attributes(batch, self.factors, prefix)

  def margins(self, phi, batch, attr_logits):
    """(b,) margins of the training batch (or the scalar m0)."""
    method = self.config.method
    if method == "mvcom":
      m = self.margin_model.apply({"params": phi}, self.attributes(batch, attr_logits),
                                  batch.get("class_prior"))
      if self.config.mvcom.center:
        # Only relative margins are learned: a common shift of all margins mostly acts
        # as a larger step size, which a one-step look-ahead always prefers.
        m = m - jnp.mean(m) + self.m0
      return m
    if method == "fixed_group_margins":
      return mvcom_lib.fixed_group_margins(batch["group"], self.m0, self.config.fixed_group_margins)
    return self.m0

  def train_loss(self, params, batch_stats, batch, rng, phi, weights=None):
    """Training-batch loss with the method's margins -> (loss, aux)."""
    cos, attr, new_stats = self.forward(params, batch_stats, batch["image"], rng)
    margin = self.margins(phi, batch, attr)
    ce = margins_lib.cross_entropy(self.logits(cos, batch["label"], margin), batch["label"])
    loss = jnp.mean(ce) if weights is None else jnp.sum(weights * ce)
    attr_loss = jnp.zeros(())
    if attr is not None:
      attr_loss = jnp.mean(mvcom_lib.attribute_loss(attr, batch, self.factors))
      loss = loss + self.config.mvcom.attr_loss_weight * attr_loss
    accuracy = jnp.mean(jnp.argmax(cos, -1) == batch["label"])
    margin = jnp.broadcast_to(jnp.asarray(margin, jnp.float32), ce.shape)
    return loss, dict(batch_stats=new_stats, ce=ce, margin=margin, accuracy=accuracy,
                      attr_loss=attr_loss)

  def meta_loss(self, params, batch_stats, batch, rng):
    """Plain-margin (m0) loss on the meta batch (keys prefixed `meta_`), batch statistics."""
    cos, _, _ = self.forward(params, batch_stats, batch["meta_image"], rng)
    labels = batch["meta_label"]
    return jnp.mean(margins_lib.cross_entropy(self.logits(cos, labels, self.m0), labels))

  def meta_objective(self, phi, state: TrainState, batch, rng):
    """L_meta(theta - lr * grad_theta L_train(theta, phi)), lr = the current learning rate.

    The virtual passes run in training mode (batch statistics); the BatchNorm statistics
    they compute are dropped here, so only the real step writes them.
    """
    stats = state.extras["batch_stats"]
    lr = self.schedule(state.step) * self.config.mvcom.virtual_lr_scale
    train_loss = lambda theta, phi: self.train_loss(theta, stats, batch, rng, phi)[0]
    meta_loss = lambda theta: self.meta_loss(theta, stats, batch, rng)
    return meta_lib.lookahead_meta_loss(phi, state.params, train_loss, meta_loss, lr)

  def meta_update(self, state: TrainState, batch, rng):
    """One bilevel update of the margin parameters -> (phi, opt_state, meta loss)."""
    value, grad = jax.value_and_grad(self.meta_objective)(state.extras["margin"], state, batch, rng)
    updates, opt_state = self.meta_tx.update(grad, state.extras["margin_opt"], state.extras["margin"])
    return optax.apply_updates(state.extras["margin"], updates), opt_state, value

  def l2rw_weights(self, state: TrainState, batch, rng):
    stats = state.extras["batch_stats"]
    per_example = lambda theta: self.train_loss(theta, stats, batch, rng, None)[1]["ce"]
    meta_loss = lambda theta: self.meta_loss(theta, stats, batch, rng)
    return meta_lib.l2rw_weights(state.params, per_example, meta_loss)

  # -- the step --

  def train_step(self, state: TrainState, batch):
    """(state, batch) -> (state, metrics). Pure; jitted by the loop."""
    rng, step_rng = jax.random.split(state.rng)
    extras = dict(state.extras)
    metrics = {}
    phi, weights = extras.get("margin"), None
    if self.config.method == "mvcom":
      k = int(self.config.mvcom.meta_every)
      if k == 1:
        phi, opt, meta_value = self.meta_update(state, batch, step_rng)
      else:
        phi, opt, meta_value = jax.lax.cond(
            state.step % k == 0,
            lambda: self.meta_update(state, batch, step_rng),
            lambda: (extras["margin"], extras["margin_opt"], jnp.zeros((), jnp.float32)))
      extras.update(margin=phi, margin_opt=opt)
      metrics["meta_loss"] = meta_value
      bound, cb = self.config.mvcom.bound, self.config.mvcom.class_bound
      for name, a in phi.items():
        offsets = (cb if name == "class" else bound) * jnp.tanh(jnp.atleast_1d(a))
        for j in range(offsets.shape[0]):
          metrics[f"margin_{name}{j if offsets.shape[0] > 1 else ''}"] = offsets[j]
    elif self.config.method == "l2rw":
      weights = self.l2rw_weights(state, batch, step_rng)
      metrics["weight_max"] = jnp.max(weights)
    grad_fn = jax.value_and_grad(self.train_loss, has_aux=True)
    (loss, aux), grads = grad_fn(state.params, extras["batch_stats"], batch, step_rng, phi, weights)
    extras["batch_stats"] = aux["batch_stats"]
    new_state = state.apply_gradients(self.tx, grads, rng=rng, extras=extras)
    metrics.update(loss=loss, ce=jnp.mean(aux["ce"]), accuracy=aux["accuracy"],
                   margin_mean=jnp.mean(aux["margin"]), lr=self.schedule(state.step))
    if self.model.attribute_dims:
      metrics["attr_loss"] = aux["attr_loss"]
    return new_state, metrics

  # -- inference --

  @functools.cached_property
  def embed_fn(self):
    """jitted (params, batch_stats, images) -> (b, d) embeddings."""
    return jax.jit(lambda params, stats, x: self.model.apply(
        {"params": params, "batch_stats": stats}, x, method=FaceModel.embed))


# --- data -------------------------------------------------------------------------------

class SyntheticBatches:
  """Random-access global batch j of the synthetic world, this process's rows.

  Keys: image, label, group, pose, occlusion, blur, class_prior; with a meta set the same
  keys prefixed `meta_` from the held-out balanced meta split.
  """

  def __init__(self, config, faces: synthetic.SyntheticFaces, with_meta: bool):
    d, self.faces, self.with_meta = config.data, faces, with_meta
    self.flip = bool(d.flip)
    self.batch_size = int(config.batch_size)
    self.rows = sampling.process_rows(config.batch_size, jax.process_index(), jax.process_count())
    self.meta_rows = sampling.process_rows(d.meta_batch_size, jax.process_index(), jax.process_count())
    if d.sampling == "group_balanced":
      groups = faces.train_groups[faces.identities("train", np.arange(len(faces)))[0]]
      self.sampler = sampling.GroupBalancedSampler(groups, config.batch_size, config.seed, salt=1)
    else:
      self.sampler = sampling.EpochSampler(len(faces), config.batch_size, config.seed, salt=1)
    self.meta_sampler = sampling.EpochSampler(faces.size("meta"), d.meta_batch_size, config.seed, salt=2)
    self.seed = config.seed

  def __call__(self, j: int) -> dict[str, np.ndarray]:
    j = int(j)
    batch = self.faces.examples("train", self.sampler(j)[self.rows])
    if self.flip:
      # Drawn for the whole global batch, then this process's rows: the same flips for any
      # number of processes.
      flip = np.random.default_rng([self.seed, 3, j]).random(self.batch_size)[self.rows] < 0.5
      batch["image"][flip] = batch["image"][flip][:, :, ::-1]
    if self.with_meta:
      meta = self.faces.examples("meta", self.meta_sampler(j)[self.meta_rows])
      batch.update({f"meta_{k}": v for k, v in meta.items()})
    return batch


def batch_iterator(make_batch: Callable[[int], Mapping[str, np.ndarray]], prefetch: int):
  """A checkpointable grain iterator over make_batch(0), make_batch(1), ..."""
  ds = grain.MapDataset.range(0, 2 ** 62).map(make_batch)
  options = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=max(prefetch, 1))
  return iter(ds.to_iter_dataset(options))


# --- the task ---------------------------------------------------------------------------

class SyntheticEvaluator:
  """Per-group / per-variation verification on the synthetic test pairs."""

  def __init__(self, config, faces: synthetic.SyntheticFaces, steps: Steps):
    self.config, self.faces, self.steps = config, faces, steps
    self.cells = faces.test_pairs()
    self.group_cells = [f"group{g}" for g in range(faces.num_groups)]
    self.last_results: Optional[dict] = None
    self.history: list[dict] = []   # learned margin offsets at each evaluation

  def embeddings(self, state) -> np.ndarray:
    fn = functools.partial(self.steps.embed_fn, state.params, state.extras["batch_stats"])
    return evaluate_lib.embed_images(lambda x: sharding.to_host(fn(x)), self.faces.test_set["image"],
                                     self.config.eval.batch_size, flip=self.config.eval.flip)

  def __call__(self, state) -> dict[str, float]:
    emb = self.embeddings(state)
    results = evaluate_lib.evaluate_cells(emb, self.cells, n_folds=self.config.eval.n_folds,
                                          far_targets=tuple(self.config.eval.far_targets))
    self.last_results = results
    scores = evaluate_lib.summarize(results, self.group_cells)
    if "margin" in state.extras:
      offsets = mvcom_lib.factor_offsets(jax.device_get(state.extras["margin"]),
                                         self.config.mvcom.bound, self.config.mvcom.class_bound)
      self.history.append({"step": int(jax.device_get(state.step)),
                           **{k: v.tolist() for k, v in offsets.items()}})
    return scores

  def finish(self, state, workdir: str) -> None:
    if self.last_results is None:
      self(state)
    if jax.process_index() != 0:   # every process evaluates; process 0 writes
      return
    results = self.last_results
    os.makedirs(workdir, exist_ok=True)
    plots.roc_curves({k: results[k] for k in self.group_cells},
                     os.path.join(workdir, "roc_groups.png"), title="ROC per group")
    plots.roc_curves({k: v for k, v in results.items() if k not in self.group_cells},
                     os.path.join(workdir, "roc_variations.png"), title="ROC per variation")
    history = margin_history(workdir) or self.history
    if history:
      plots.margin_history(history, os.path.join(workdir, "margins.png"))
    summary = evaluate_lib.summarize(results, self.group_cells)
    table = evaluate_lib.format_table(
        {name: {"acc": r["accuracy"], "std": r["accuracy_std"],
                **{k: v for k, v in r.items() if k.startswith("tar@")}}
         for name, r in results.items()},
        ["acc", "std"] + [f"tar@far={f:g}" for f in self.config.eval.far_targets])
    text = (f"{table}\nworst group {100 * summary['acc_worst_group']:.2f}  "
            f"gap {100 * summary['group_gap']:.2f}  (accuracy in %, {self.config.eval.n_folds}-fold)")
    print(text, flush=True)
    with open(os.path.join(workdir, "eval_table.txt"), "w") as f:
      f.write(text + "\n")
    with open(os.path.join(workdir, "eval_summary.json"), "w") as f:
      json.dump(summary, f, indent=2)


def margin_history(workdir: str) -> list[dict]:
  """Learned margin offsets per logged step, from the loop's metrics.jsonl."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      vals = {k[len("train/margin_"):]: v for k, v in row.items()
              if k.startswith("train/margin_") and k != "train/margin_mean"}
      if vals:
        rows.append({"step": row["step"], **{k: [v] for k, v in vals.items()}})
  return rows


def make_task(config, mesh) -> Task:
  """The face task for `train_jax.loop.train_and_evaluate`."""
  del mesh  # shardings come from the logical axis names
  from train_jax import optimizers  # the loop's optimizer factory
  tx, schedule = optimizers.make_optimizer(config.optimizer, config.total_steps)
  return make_task_with(config, tx, schedule)


def make_task_with(config, tx, schedule) -> Task:
  """make_task with a given optimizer (tests, studies)."""
  check_config(config)
  if config.data.name == "synthetic":
    faces = synthetic.SyntheticFaces(config.data, config.seed)
    steps = Steps(config, build_model(config, faces.num_classes), tx, schedule)
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    data = batch_iterator(SyntheticBatches(config, faces, uses_meta_batch(config)),
                          config.data.prefetch_batches)
    evaluator = SyntheticEvaluator(config, faces, steps)
    return Task(init=lambda rng: steps.init(rng, image_shape), train_step=steps.train_step,
                train_data=data, evaluate=evaluator, finish=evaluator.finish,
                loss_keys=("loss",))
  if config.data.name == "real":
    from face_jax import real_data  # insightface formats; imported only when used
    return real_data.make_task(config, tx, schedule)
  raise ValueError(f"config.data.name={config.data.name!r}; known: synthetic, real")
