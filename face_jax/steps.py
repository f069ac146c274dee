"""The face task's model and pure step functions, shared by the synthetic and real tasks.

Methods (config.method), all with the same model, data, step and evaluation code:
  plain                CosFace / ArcFace with the base margin m0 (config.loss)
  fixed_margins        hand-set m_i = m0 + group / variation / class-prior offsets
                       (config.fixed_margins; face_jax/mvcom.py fixed_margins)
  mvcom                m_i from the additive margin model (face_jax/mvcom.py), whose
                       parameters are meta-learned through a virtual SGD step on the
                       held-out balanced meta set (face_jax/meta.py)
  l2rw                 m0, and per-sample loss weights from learning-to-reweight
Group-balanced sampling is `config.data.sampling = "group_balanced"`.

Meta objectives (config.mvcom.meta_objective), both with the base margin m0:
  ce         classification of held-out images of training identities (the classifier
             rows exist): measures within-identity generalisation
  prototype  open set: each meta image against leave-one-out prototypes (mean embeddings)
             of the identities in the meta batch, which may be identities never trained
             on (data.meta_identities = "heldout"): generalisation to new identities,
             where a minority's deficit lies

Logged per group g (when the batch has groups): the mean margined target probability
`p_target_group<g>`, the fraction of samples whose margined target logit wins
`margin_met_group<g>`, and (mvcom) the meta loss `meta_loss_group<g>` at the virtual step.

State: params = model parameters (backbone, classifier, attribute heads); extras =
{"batch_stats": BatchNorm statistics, "margin": margin-model parameters,
"margin_opt": their Adam state}. A step of `mvcom`:
  1. every `meta_every` steps: phi <- Adam(grad_phi L_meta(theta - lr * grad_theta
     L_train(theta, phi))), lr = the current learning rate; the virtual passes use batch
     statistics and their BatchNorm updates are discarded;
  2. the real step on theta with the margins m(phi) just updated, which alone writes the
     BatchNorm statistics.
"""

import copy
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from face_jax import margins as margins_lib
from face_jax import meta as meta_lib
from face_jax import mvcom as mvcom_lib
from face_jax.models import iresnet
from face_jax.models.face import FaceModel
from train_jax.state import TrainState

METHODS = ("plain", "fixed_margins", "mvcom", "l2rw")
META_OBJECTIVES = ("ce", "prototype")
SLOTS = ("m1", "m2", "m3")
META_DTYPES = ("float32", "model")


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
  if config.mvcom.meta_dtype not in META_DTYPES:
    raise ValueError(f"config.mvcom.meta_dtype={config.mvcom.meta_dtype!r}; known: "
                     f"{', '.join(META_DTYPES)}")
  if config.mvcom.meta_objective not in META_OBJECTIVES:
    raise ValueError(f"config.mvcom.meta_objective={config.mvcom.meta_objective!r}; "
                     f"known: {', '.join(META_OBJECTIVES)}")
  if (config.data.name == "synthetic" and config.data.meta_identities == "heldout"
      and config.mvcom.meta_objective == "ce" and uses_meta_batch(config)):
    raise ValueError("config.data.meta_identities='heldout' has no classifier rows: use "
                     "config.mvcom.meta_objective='prototype'")


def num_groups(config) -> int:
  """Groups to log per-group diagnostics for (0: the data has none)."""
  if config.data.name == "synthetic":
    return len(config.data.group_fractions)
  return dict((str(n), int(k)) for n, k in config.mvcom.factors).get("group", 0)


def per_group_mean(values, groups, n: int) -> dict[int, jax.Array]:
  """{g: mean of values over the rows of group g} (0 where the batch has none of it)."""
  onehot = jax.nn.one_hot(groups, n, dtype=jnp.float32)            # (b, n)
  sums = jnp.einsum("bn,b->n", onehot, values.astype(jnp.float32))
  counts = jnp.sum(onehot, 0)
  means = sums / jnp.maximum(counts, 1.0)
  return {g: means[g] for g in range(n)}


def prototype_losses(emb, labels, s: float, m: float):
  """(b,) open-set meta losses: sample i against the prototypes of the batch's identities.

  The prototype of identity c for sample i is the sum of c's embeddings (L2-normalised
  first) without sample i itself (leave-one-out), compared by cosine; logits s*cos, the
  own identity's lowered by the margin m; CE over the distinct identities in the batch.
  Every identity needs >= 2 images in the batch (else its own prototype is empty).
  """
  e = emb.astype(jnp.float32)
  e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
  same = (labels[:, None] == labels[None, :]).astype(jnp.float32)   # (b, b): i, j same id
  sums = same @ e                                                   # (b, d): class sum of j
  dots = e @ sums.T - same * jnp.sum(e * e, -1)[:, None]            # e_i . (C_j - [same] e_i)
  sq = (jnp.sum(sums * sums, -1)[None, :] - 2 * same * (e @ sums.T)
        + same * jnp.sum(e * e, -1)[:, None])                       # |C_j - [same] e_i|^2
  cos = dots / jnp.sqrt(jnp.maximum(sq, 1e-12))
  b = labels.shape[0]
  first = jnp.argmax(same, axis=1)                                  # first row of i's id
  is_first = first == jnp.arange(b)                                 # one column per id
  logits = s * (cos - m * same)
  logits = jnp.where(is_first[None, :], logits, -jnp.inf)
  target = jnp.take_along_axis(logits, first[:, None], 1)[:, 0]
  return jax.nn.logsumexp(logits, -1) - target


def uses_meta_batch(config) -> bool:
  if config.method == "mvcom":
    return not config.mvcom.frozen   # frozen margins take no meta step
  return config.method == "l2rw"


# --- losses and steps -------------------------------------------------------------------

class Steps:
  """The pure functions of the task, built once from the config.

  Attributes set in __init__: model, margin_model, tx, schedule, meta_tx, groups.
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
    self.groups = num_groups(config)
    self.meta_view = self._meta_view()

  def _meta_view(self) -> "Steps":
    """These steps with the backbone computing in at least float32 (mvcom.meta_dtype
    "float32") for the meta passes: the virtual step of MvCoM and L2RW's scores.

    The meta-gradient is a small second-order quantity; in bfloat16 it pointed elsewhere
    than in float32 at one initialisation of the test model (cosine 0.68; >= 0.9999 after
    a step), see tests/face_jax/test_face_meta_dtype.py. "model" keeps the model's dtype.
    """
    compute = jnp.dtype(self.config.model.dtype)
    meta = jnp.promote_types(compute, jnp.float32)
    if self.config.mvcom.meta_dtype == "model" or meta == compute:
      return self
    view = copy.copy(self)
    view.model = self.model.clone(backbone=self.model.backbone.clone(dtype=meta))
    view.meta_view = view
    return view

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
      phi = init_phi(phi, self.config.mvcom)
      extras.update(margin=phi, margin_opt=self.meta_tx.init(phi))
    return TrainState.create(params=variables["params"], tx=self.tx, rng=state_rng, extras=extras)

  # -- pieces --

  def forward(self, params, batch_stats, images, rng, with_embeddings=False):
    """Training-mode forward: (cos (b, c), attribute logits or None, new batch_stats)
    [+ embeddings (b, d) with `with_embeddings`]."""
    (emb, cos, attr), mutated = self.model.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True,
        mutable=["batch_stats"], rngs={"dropout": rng})
    if with_embeddings:
      return cos, attr, mutated["batch_stats"], emb
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
    return mvcom_lib.oracle_attributes(batch, self.factors, prefix, degrees=self.config.mvcom.degrees)

  def margins(self, phi, batch, attr_logits, rng=None):
    """(b,) margins of the training batch (or the scalar m0).

    mvcom with `center`: |m_i - m0| <= 2 (class_bound + #factors * bound).
    """
    method = self.config.method
    if method == "mvcom":
      attrs = self.attributes(batch, attr_logits)
      if self.config.mvcom.shuffle_attributes:
        # Ablation: the margin model sees another sample's attributes (same batch mix).
        perm = jax.random.permutation(jax.random.fold_in(rng, 7), batch["label"].shape[0])
        attrs = {k: v[perm] for k, v in attrs.items()}
      m = self.margin_model.apply({"params": phi}, attrs, batch.get("class_prior"))
      if self.config.mvcom.center:
        # Only relative margins are learned: a common shift of all margins mostly acts
        # as a larger step size, which a one-step look-ahead always prefers.
        m = m - jnp.mean(m) + self.m0
      return m
    if method == "fixed_margins":
      return mvcom_lib.fixed_margins(batch, self.m0, self.config.fixed_margins,
                                     degrees=self.config.mvcom.degrees)
    return self.m0

  def train_loss(self, params, batch_stats, batch, rng, phi, weights=None):
    """Training-batch loss with the method's margins -> (loss, aux)."""
    cos, attr, new_stats = self.forward(params, batch_stats, batch["image"], rng)
    margin = self.margins(phi, batch, attr, rng)
    logits = self.logits(cos, batch["label"], margin)
    ce = margins_lib.cross_entropy(logits, batch["label"])
    loss = jnp.mean(ce) if weights is None else jnp.sum(weights * ce)
    attr_loss = jnp.zeros(())
    if attr is not None:
      attr_loss = jnp.mean(mvcom_lib.attribute_loss(attr, batch, self.factors))
      loss = loss + self.config.mvcom.attr_loss_weight * attr_loss
    accuracy = jnp.mean(jnp.argmax(cos, -1) == batch["label"])
    margin = jnp.broadcast_to(jnp.asarray(margin, jnp.float32), ce.shape)
    # Is the margin binding? p of the target under the margined softmax, and whether the
    # margined target logit still wins.
    p_target = jnp.exp(-jax.lax.stop_gradient(ce))
    met = (jnp.argmax(jax.lax.stop_gradient(logits), -1) == batch["label"]).astype(jnp.float32)
    return loss, dict(batch_stats=new_stats, ce=ce, margin=margin, accuracy=accuracy,
                      attr_loss=attr_loss, p_target=p_target, margin_met=met)

  def meta_losses(self, params, batch_stats, batch, rng):
    """(b_meta,) plain-margin (m0) losses on the meta batch (keys prefixed `meta_`),
    batch statistics; config.mvcom.meta_objective picks CE or the prototype loss."""
    labels = batch["meta_label"]
    if self.config.mvcom.meta_objective == "prototype":
      _, _, _, emb = self.forward(params, batch_stats, batch["meta_image"], rng, with_embeddings=True)
      return prototype_losses(emb, labels, self.config.loss.s, self.m0)
    cos, _, _ = self.forward(params, batch_stats, batch["meta_image"], rng)
    return margins_lib.cross_entropy(self.logits(cos, labels, self.m0), labels)

  def meta_loss(self, params, batch_stats, batch, rng):
    """The mean meta loss (scalar)."""
    return jnp.mean(self.meta_losses(params, batch_stats, batch, rng))

  def _meta_loss_and_groups(self, params, batch_stats, batch, rng):
    losses = self.meta_losses(params, batch_stats, batch, rng)
    groups = (per_group_mean(losses, batch["meta_group"], self.groups)
              if self.groups and "meta_group" in batch else {})
    return jnp.mean(losses), groups

  def meta_objective(self, phi, state: TrainState, batch, rng):
    """L_meta(theta - lr * grad_theta L_train(theta, phi)), lr = the current learning rate.

    The virtual passes run in training mode (batch statistics); the BatchNorm statistics
    they compute are dropped here, so only the real step writes them.
    """
    return self._meta_objective_and_groups(phi, state, batch, rng)[0]

  def _meta_objective_and_groups(self, phi, state: TrainState, batch, rng):
    stats = state.extras["batch_stats"]
    lr = self.schedule(state.step) * self.config.mvcom.virtual_lr_scale
    view = self.meta_view
    train_loss = lambda theta, phi: view.train_loss(theta, stats, batch, rng, phi)[0]
    meta_loss = lambda theta: view._meta_loss_and_groups(theta, stats, batch, rng)
    return meta_lib.lookahead_meta_loss(phi, state.params, train_loss, meta_loss, lr)

  def meta_update(self, state: TrainState, batch, rng):
    """One bilevel update of the margin parameters -> (phi, opt_state, meta loss,
    {group: meta loss})."""
    (value, groups), grad = jax.value_and_grad(self._meta_objective_and_groups, has_aux=True)(
        state.extras["margin"], state, batch, rng)
    updates, opt_state = self.meta_tx.update(grad, state.extras["margin_opt"], state.extras["margin"])
    return optax.apply_updates(state.extras["margin"], updates), opt_state, value, groups

  def l2rw_weights(self, state: TrainState, batch, rng):
    stats = state.extras["batch_stats"]
    view = self.meta_view
    per_example = lambda theta: view.train_loss(theta, stats, batch, rng, None)[1]["ce"]
    meta_loss = lambda theta: view.meta_loss(theta, stats, batch, rng)
    return meta_lib.l2rw_weights(state.params, per_example, meta_loss)

  # -- the step --

  def train_step(self, state: TrainState, batch):
    """(state, batch) -> (state, metrics). Pure; jitted by the loop."""
    rng, step_rng = jax.random.split(state.rng)
    extras = dict(state.extras)
    metrics = {}
    phi, weights = extras.get("margin"), None
    if self.config.method == "mvcom":
      if not self.config.mvcom.frozen:   # frozen: the margins stay at their initial values
        k = int(self.config.mvcom.meta_every)
        if k == 1:
          phi, opt, meta_value, meta_groups = self.meta_update(state, batch, step_rng)
        else:
          skip = lambda: (extras["margin"], extras["margin_opt"], jnp.zeros((), jnp.float32),
                          {g: jnp.zeros((), jnp.float32) for g in range(self.groups)}
                          if "meta_group" in batch else {})
          phi, opt, meta_value, meta_groups = jax.lax.cond(
              state.step % k == 0, lambda: self.meta_update(state, batch, step_rng), skip)
        extras.update(margin=phi, margin_opt=opt)
        metrics["meta_loss"] = meta_value
        metrics.update({f"meta_loss_group{g}": v for g, v in meta_groups.items()})
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
    if self.groups and "group" in batch:
      for key in ("p_target", "margin_met"):
        for g, v in per_group_mean(aux[key], batch["group"], self.groups).items():
          metrics[f"{key}_group{g}"] = v
    return new_state, metrics

  # -- inference --

  @functools.cached_property
  def embed_fn(self):
    """jitted (params, batch_stats, images) -> (b, d) embeddings."""
    return jax.jit(lambda params, stats, x: self.model.apply(
        {"params": params, "batch_stats": stats}, x, method=FaceModel.embed))




def init_phi(phi, mvcom_cfg):
  """Margin parameters at `mvcom.init_offsets` ((name, offsets), ...) in margin units
  (alpha = artanh(offset / bound)); the rest at 0 (plain m0)."""
  phi = dict(phi)
  for name, offsets in mvcom_cfg.init_offsets:
    if name not in phi:
      raise KeyError(f"config.mvcom.init_offsets: no margin parameter {name!r} (have {sorted(phi)})")
    bound = mvcom_cfg.class_bound if name == "class" else mvcom_cfg.bound
    values = np.asarray(offsets, np.float32).reshape(np.shape(phi[name]))
    if np.any(np.abs(values) >= bound):
      raise ValueError(f"config.mvcom.init_offsets[{name!r}]={tuple(np.ravel(values))}: each "
                       f"must be inside the bound ({bound})")
    phi[name] = jnp.asarray(np.arctanh(values / bound), jnp.float32)
  return phi
