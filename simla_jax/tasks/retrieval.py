"""SIMLA image-text retrieval: fine-tuning (the official Retrieval.py) and evaluation.

  python run.py --config=configs/simla_retrieval.py                    # shapes world
  python run.py --config=configs/simla_retrieval.py:eval --config.init.checkpoint=CKPT \
      --config.eval.files.test=flickr_test.json --config.data.captions.image_root=IMAGES

Model: the pretrained SIMLA without its MLM / MIM / concept heads and ViT mask token
(`RETRIEVAL_MODULES`), momentum copies of the ViT, BERT and both projections, ITC
queues of momentum features with their image ids.

Loss = ITC + ITM, as `models/simla/retrieval.py`:
  ITC  every entry of [batch ; queue] with the example's image id is a positive, the
       target is uniform over them, mixed with the momentum model's softmax (alpha);
  ITM  one hard negative text per image and image per text, drawn from the softmax of
       the in-batch similarities with every entry of the same image id excluded.
The id queue is updated with the batch ids; `compat.idx_queue_frozen=True` keeps it at
its initial -100 as the official code does (it never enqueues ids, so queue entries are
never positives).

Initialisation (`init.checkpoint`): a workdir of this project (pretraining or retrieval
run; the model is rebuilt from its config.json, so the parameter layout is the one the
checkpoint was written with) or an official `.pth` (model from `config.model`). The
position embedding is resized bicubically when `data.image_size` differs.

Evaluation: ITC top-k re-ranked by ITM (`simla_jax.retrieval.Evaluator`). While
training only `eval.splits` (val) are read; `eval.final_splits` (test and the
compositional splits) and minimal pairs are scored once, after the last step.
`config.eval_only=True` (the `:eval` variant) scores `eval.final_splits` of the
checkpoint without training and writes them to metrics.jsonl.
"""

import dataclasses
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simla_jax import objectives as obj
from simla_jax import retrieval
from simla_jax import train as simla_train
from simla_jax.data import pipeline
from simla_jax.data import retrieval_pairs
from simla_jax.models import SIMLA, ema_update, init_params, init_queues
from simla_jax.models import vit as vit_lib
from simla_jax.tasks import finetune
from train_jax import optimizers
from train_jax.state import TrainState
from train_jax.task import Task

LOSSES = ("itc", "itm")
# What the retrieval model keeps of the pretrained SIMLA; the rest is dropped on load.
RETRIEVAL_MODULES = ("vit", "bert", "vision_proj", "text_proj", "itm_head", "temp")
MOMENTUM_MODULES = ("vit", "bert", "vision_proj", "text_proj")
DROPPED = {"vit": ("mask_token",), "bert": ("mlm_head",)}
IDX_QUEUE_INIT = -100   # the official idx_queue buffer's fill: matches no image id
_QUEUE_KEYS = ("image_queue", "text_queue", "queue_ptr")   # loaded as the official load does


# --------------------------------------------------------------------------- objectives
def id_positive_targets(idx_b, idx_all_n):
  """(B, N) ITC targets: uniform over the entries of `idx_all` with the row's image id.

  idx_b (B,) image ids of the batch; idx_all_n (N,) ids of [batch ; queue].
  """
  pos_b_n = (idx_b[:, None] == idx_all_n[None, :]).astype(jnp.float32)
  return pos_b_n / pos_b_n.sum(-1, keepdims=True)


def itc_id_loss(img_b_e, txt_b_e, img_m_b_e, txt_m_b_e, image_queue_q_e, text_queue_q_e,
                idx_b, idx_queue_q, temp, alpha):
  """ITC with image-id positives and momentum distillation (official retrieval ITC).

  Returns (loss, sim_i2t (B, B+Q), sim_t2i (B, B+Q)).
  """
  targets = id_positive_targets(idx_b, jnp.concatenate([idx_b, idx_queue_q]))
  return obj.itc_loss(img_b_e, txt_b_e, img_m_b_e, txt_m_b_e, image_queue_q_e, text_queue_q_e,
                      temp, alpha, targets_b_n=targets)


def sample_negatives_excluding_ids(rng, sim_i2t_b_b, sim_t2i_b_b, idx_b, shards: int = 1):
  """One negative text per image and image per text from the in-batch softmax, never
  an entry with the same image id. Returns (neg_text (B,), neg_image (B,)) indices.

  `shards` > 1: only within the row's contiguous block of B / shards rows (the
  data-parallel shard: the official code samples per GPU, `itm.negatives_from="device"`).
  A row whose candidates all share its id has no negative and gets index 0 (the
  official torch.multinomial would fail); batches of distinct ids never hit this.
  """
  b = idx_b.shape[0]
  if b % shards:
    raise ValueError(f"ITM negatives: batch {b} does not split into {shards} shards")
  block_b = jnp.arange(b) // (b // shards)
  excluded_b_b = (idx_b[:, None] == idx_b[None, :]) | (block_b[:, None] != block_b[None, :])
  rng_t, rng_i = jax.random.split(rng)
  sims = jax.lax.stop_gradient((sim_i2t_b_b.astype(jnp.float32), sim_t2i_b_b.astype(jnp.float32)))
  neg_text = jax.random.categorical(rng_t, jnp.where(excluded_b_b, -jnp.inf, sims[0]), axis=-1)
  neg_image = jax.random.categorical(rng_i, jnp.where(excluded_b_b, -jnp.inf, sims[1]), axis=-1)
  return neg_text, neg_image


def enqueue_ids(idx_queue_q, idx_b, ptr):
  """Writes the batch ids at rows [ptr, ptr+B) of the id queue (Q a multiple of B)."""
  return jax.lax.dynamic_update_slice(idx_queue_q, idx_b.astype(idx_queue_q.dtype), (ptr,))


def update_queues(extras, img_m_b_e, txt_m_b_e, idx_b, idx_queue_frozen: bool) -> dict:
  """The batch's momentum features (and ids, unless frozen) written at the queue pointer."""
  ptr = extras["queue_ptr"]
  out = {}
  out["image_queue"], _ = obj.enqueue(extras["image_queue"], img_m_b_e, ptr)
  out["text_queue"], out["queue_ptr"] = obj.enqueue(extras["text_queue"], txt_m_b_e, ptr)
  out["idx_queue"] = (extras["idx_queue"] if idx_queue_frozen
                      else enqueue_ids(extras["idx_queue"], idx_b, ptr))
  return out


# --------------------------------------------------------------------------- checkpoints
@dataclasses.dataclass
class Pretrained:
  """A checkpoint read for retrieval: numpy trees restricted to the retrieval model."""
  model_config: ml_collections.ConfigDict
  params: dict
  params_m: dict | None    # None: the checkpoint has none (momentum starts as params)
  queues: dict | None      # image_queue / text_queue (Q, E), queue_ptr; None: fresh
  step: int
  source: str


def retrieval_subset(tree: Mapping[str, Any], modules=RETRIEVAL_MODULES,
                     dropped: Mapping[str, tuple[str, ...]] = DROPPED) -> dict:
  """The entries of a SIMLA param tree the retrieval model uses (`dropped`: the
  sub-entries left out, e.g. VQA keeps the MLM head for its decoder)."""
  out = {}
  for k in modules:
    if k in tree:
      value = tree[k]
      if k in dropped:
        value = {n: v for n, v in value.items() if n not in dropped[k]}
      out[k] = value
  return out


def read_run_config(workdir: str) -> dict:
  """The config.json a run of this project wrote in `workdir`, as a dict."""
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except OSError as e:
    raise FileNotFoundError(f"init.checkpoint: {workdir} is a directory without a readable "
                            f"config.json (a run of this project writes one): {e}") from e


def workdir_model_config(workdir: str) -> ml_collections.ConfigDict:
  """The model a workdir's checkpoints hold, from its config.json (unresolved -1 sizes)."""
  run = read_run_config(workdir)
  family = run.get("family")
  if family == "simla":
    return ml_collections.ConfigDict(run["model"])
  if family == "simla_retrieval":
    source = run["init"]["checkpoint"]
    if os.path.isdir(source):
      base = workdir_model_config(source)
    else:
      base = ml_collections.ConfigDict(run["model"])
    return retrieval_model_overrides(base, ml_collections.ConfigDict(run))
  raise ValueError(f"init.checkpoint: {workdir}/config.json is a {family!r} run; expected a "
                   f"SIMLA pretraining or retrieval run")


def retrieval_model_overrides(model_cfg, config) -> ml_collections.ConfigDict:
  """The fine-tuning model: no mask token (official `vit_mask_token: false`), the
  fine-tuning config's image size and BERT dropout (`bert_dropout`)."""
  m = ml_collections.ConfigDict(model_cfg.to_dict())
  m.use_mask_token = False
  m.image_size = int(config.data.image_size)
  if config.get("bert_dropout") is not None:   # absent from configs written before it
    m.bert.update(**config.bert_dropout)
  return m


def _restore_state(checkpoints: str) -> tuple[dict, int]:
  """The latest Orbax train state under `checkpoints`, as host numpy trees."""
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(checkpoints)
  step = manager.latest_step()
  manager.close()
  if step is None:
    raise FileNotFoundError(f"init.checkpoint: no checkpoint in {checkpoints}")
  path = os.path.join(checkpoints, str(step), "state")
  tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
  # Only params and extras: restored onto this host's first device whatever the mesh
  # that wrote them.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  wanted = {k: tree[k] for k in ("params", "extras") if k in tree}
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          wanted)
  restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=abstract, partial_restore=True,
      restore_args=jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract)))
  return jax.tree.map(np.asarray, restored), int(step)


def load_pretrained(config, dropped: Mapping[str, tuple[str, ...]] = DROPPED) -> Pretrained:
  """Reads `config.init.checkpoint` (a workdir or an official .pth); see module doc.
  `dropped`: what `retrieval_subset` leaves out of the ViT / BERT trees."""
  path = config.init.checkpoint
  if not path:
    raise ValueError("init.checkpoint is required: a pretraining workdir (e.g. runs/simla) "
                     "or an official SIMLA .pth")
  if os.path.isdir(path):
    model_cfg = retrieval_model_overrides(workdir_model_config(path), config)
    state, step = _restore_state(os.path.join(path, "checkpoints"))
    extras = state.get("extras", {})
    params = retrieval_subset(state["params"], dropped=dropped)
    params_m = extras.get("momentum")
    params_m = (retrieval_subset(params_m, MOMENTUM_MODULES, dropped)
                if params_m is not None else None)
    queues = ({k: extras[k] for k in _QUEUE_KEYS} if set(_QUEUE_KEYS) <= set(extras)
              else None)
    pretrained = Pretrained(model_cfg, params, params_m, queues, step, path)
    return _resize_positions(pretrained)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"init.checkpoint: {path} is neither a workdir nor a file")
  from simla_jax import convert  # torch only when an official checkpoint is read
  model_cfg = retrieval_model_overrides(config.model, config)
  if model_cfg.bert.vocab_size == -1:
    model_cfg.bert.vocab_size = pipeline.make_tokenizer(config.data).vocab_size
  params, params_m, queues = convert.load_official_checkpoint(path, model_cfg)
  if params_m is not None:   # fine-tuned layouts may come without momentum copies
    params_m = retrieval_subset(params_m, MOMENTUM_MODULES, dropped)
  queues = {k: queues[k] for k in _QUEUE_KEYS} if set(_QUEUE_KEYS) <= set(queues or {}) else None
  return Pretrained(model_cfg, retrieval_subset(params, dropped=dropped), params_m, queues, 0,
                    path)


def _resize_positions(p: Pretrained) -> Pretrained:
  grid = p.model_config.image_size // p.model_config.patch_size
  for tree in (p.params, p.params_m):
    if tree is not None and tree["vit"]["pos_embed"].shape[1] != 1 + grid ** 2:
      tree["vit"]["pos_embed"] = vit_lib.interpolate_pos_embed(tree["vit"]["pos_embed"],
                                                               grid ** 2)
  return p


def resolve_model_config(model_cfg, tokenizer, params) -> ml_collections.ConfigDict:
  """-1 sizes from the data / the checkpoint; the vocabulary must match the checkpoint's."""
  m = ml_collections.ConfigDict(model_cfg.to_dict())
  if m.bert.vocab_size == -1:
    m.bert.vocab_size = tokenizer.vocab_size
  words = params["bert"]["embeddings"]["word_embeddings"]["embedding"].shape[0]
  if m.bert.vocab_size != tokenizer.vocab_size or words != tokenizer.vocab_size:
    raise ValueError(f"the checkpoint's vocabulary has {words} words, the tokenizer of "
                     f"config.data {tokenizer.vocab_size}: use the pretraining run's "
                     f"data.tokenizer (vocab_file) for fine-tuning")
  if m.codebook_size == -1:
    m.codebook_size = 1   # the MIM head is dropped; any size builds the abstract tree
  return m


def place(abstract_boxed: Any, values: Any, what: str) -> Any:
  """`values` in the boxed structure of `abstract_boxed`; names every mismatch."""
  want = {k: v for k, v in _flatten(nn.meta.unbox(abstract_boxed)).items()}
  have = _flatten(values)
  problems = [f"missing {k} {want[k].shape}" for k in sorted(set(want) - set(have))]
  problems += [f"unexpected {k} {have[k].shape}" for k in sorted(set(have) - set(want))]
  problems += [f"{k}: checkpoint {have[k].shape}, model {want[k].shape}"
               for k in sorted(set(want) & set(have)) if tuple(have[k].shape) != want[k].shape]
  if problems:
    raise ValueError(f"{what} does not fit the retrieval model:\n  " + "\n  ".join(problems))
  return jax.tree.map(lambda box, v: (box.replace_boxed(np.asarray(v, box.value.dtype))
                                      if isinstance(box, nn.meta.AxisMetadata)
                                      else np.asarray(v, box.dtype)),
                      abstract_boxed, values,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    return out
  return {prefix: tree}


# --------------------------------------------------------------------------- task
def check_config(config, mesh=None) -> None:
  """Queue / batch / ITM-sharding consistency, as the pretraining task checks it."""
  simla_train.check_config(config, mesh)


def make_train_step(config, model: SIMLA, tx, schedule, shards: int = 1):
  """Returns the pure `(state, batch) -> (state, metrics)` retrieval fine-tuning step;
  ITM negatives are drawn within `shards` blocks of the batch."""
  mcfg = model.config

  def run(params, method, *args, rng=None, **kwargs):
    if rng is not None:   # train mode: dropout on
      kwargs.update(deterministic=False, rngs={"dropout": rng})
    return model.apply({"params": params}, *args, method=method, **kwargs)

  def train_step(state: TrainState, batch):
    rng, k_m, k_neg, k_online = jax.random.split(state.rng, 4)
    alpha = obj.alpha_at(state.step, config.alpha, config.alpha_warmup_steps)
    images, ids, mask, idx = batch["image"], batch["text_ids"], batch["text_mask"], batch["image_id"]
    b = ids.shape[0]
    extras = state.extras

    # As the official forward: the momentum copies are updated before they are used.
    params_m = ema_update(extras["momentum"], state.params, mcfg.momentum)
    img_m = run(params_m, SIMLA.image_feature,
                run(params_m, SIMLA.embed_image, images, rng=jax.random.fold_in(k_m, 0)))
    txt_m = run(params_m, SIMLA.text_feature,
                run(params_m, SIMLA.embed_text, ids, mask, rng=jax.random.fold_in(k_m, 1),
                    cls_only=True))

    def loss_fn(params):
      drop = lambda i: jax.random.fold_in(k_online, i)
      temp = obj.clamp_temperature(params["temp"], mcfg.temp_min, mcfg.temp_max)
      image_seq = run(params, SIMLA.embed_image, images, rng=drop(0))
      img = run(params, SIMLA.image_feature, image_seq)
      txt = run(params, SIMLA.text_feature,
                run(params, SIMLA.embed_text, ids, mask, rng=drop(1), cls_only=True))
      itc, sim_i2t, sim_t2i = itc_id_loss(img, txt, img_m, txt_m, extras["image_queue"],
                                          extras["text_queue"], idx, extras["idx_queue"],
                                          temp, alpha)
      neg_text, neg_image = sample_negatives_excluding_ids(k_neg, sim_i2t[:, :b],
                                                           sim_t2i[:, :b], idx, shards)
      # One multimodal pass over 3B pairs: (text, image), (text, negative image),
      # (negative text, image); each image's cross-attention keys/values once.
      rows = jnp.arange(b)
      fused3 = run(params, SIMLA.fuse, jnp.concatenate([ids, ids, ids[neg_text]]),
                   jnp.concatenate([mask, mask, mask[neg_text]]), image_seq,
                   image_index=jnp.concatenate([rows, neg_image, rows]), rng=drop(2),
                   cls_only=True)
      itm, itm_acc = obj.itm_loss(run(params, SIMLA.itm_logits, fused3))
      losses = dict(itc=itc, itm=itm)
      total = sum(float(config.loss_weights[k]) * v for k, v in losses.items())
      return total, (losses, itm_acc)

    (loss, (losses, itm_acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new = state.apply_gradients(tx, grads, rng=rng)
    params = {**new.params, "temp": jnp.clip(new.params["temp"], mcfg.temp_min, mcfg.temp_max)}
    out = dict(extras, momentum=params_m,
               **update_queues(extras, img_m, txt_m, idx, config.compat.idx_queue_frozen))
    metrics = dict(loss=loss, **losses, itm_acc=itm_acc, alpha=alpha, temp=params["temp"],
                   lr=schedule(state.step))
    return new.replace(params=params, extras=out), metrics

  return train_step


def build_model(config, tokenizer, pretrained: Pretrained) -> SIMLA:
  return SIMLA(resolve_model_config(pretrained.model_config, tokenizer, pretrained.params))


def make_init(config, model: SIMLA, tx, pretrained: Pretrained):
  """rng -> TrainState holding the checkpoint's weights (boxed with their logical axes)."""
  abstract = jax.eval_shape(lambda k: init_params(model, k), jax.random.key(0))
  abstract = retrieval_subset(abstract)
  params = place(abstract, pretrained.params, f"{pretrained.source} params")
  momentum = place(retrieval_subset(abstract, MOMENTUM_MODULES),
                   pretrained.params_m or retrieval_subset(pretrained.params, MOMENTUM_MODULES),
                   f"{pretrained.source} momentum params")
  q = pretrained.queues
  keep_queues = q is not None and q["image_queue"].shape == (config.queue_size,
                                                             model.config.embed_dim)

  def init(rng):
    k_queues, k_state = jax.random.split(rng)
    # The official load keeps the pretraining queues (same size) as negatives.
    queues = (jax.tree.map(jnp.asarray, q) if keep_queues else
              init_queues(k_queues, config.queue_size, model.config.embed_dim))
    extras = dict(momentum=momentum, **queues,
                  idx_queue=jnp.full((config.queue_size,), IDX_QUEUE_INIT, jnp.int32))
    return TrainState.create(params=params, tx=tx, rng=k_state, extras=extras)

  return init


def eval_data_configs(config, splits) -> dict[str, Any]:
  """Caption-JSON splits read their own file (`eval.files.<split>`)."""
  if config.data.name != "captions":
    return {}
  out = {}
  for split in splits:
    path = config.eval.files.get(split, "")
    if not path:
      raise ValueError(f"eval.files.{split}: an ALBEF eval JSON is required for the "
                       f"{split!r} split of caption data")
    d = ml_collections.ConfigDict(config.data.to_dict())
    d.captions.eval_files = (path,)
    out[split] = d
  return out


def make_evaluator(config, model, tokenizer, splits) -> retrieval.Evaluator:
  return retrieval.Evaluator(model, config.eval, config.data, tokenizer, splits=splits,
                             data_cfgs=eval_data_configs(config, splits),
                             minimal_pairs=[s for s in config.eval.minimal_pairs if s in splits])


def train_source(config):
  d = config.data
  if d.name == "shapes":
    return retrieval_pairs.ShapesPairs(d, int(config.finetune_images))
  if not d.captions.train_files:
    raise ValueError("data.captions.train_files: the retrieval train JSON is required")
  return retrieval_pairs.CaptionPairs(list(d.captions.train_files), d.captions.image_root)


def make_task(config, mesh) -> Task:
  check_config(config, mesh)   # shardings come from the params' logical axis names
  tokenizer = pipeline.make_tokenizer(config.data)
  pretrained = load_pretrained(config)
  model = build_model(config, tokenizer, pretrained)
  tx, schedule = optimizers.make_optimizer(config.optimizer, config.total_steps)
  train_data = pipeline.make_train_iterator(
      config.data, batch_size=config.batch_size // jax.process_count(), tokenizer=tokenizer,
      source=train_source(config))
  splits, final = finetune.schedule(config)
  evaluator = make_evaluator(config, model, tokenizer, splits + final)

  def evaluate(state):
    return evaluator(state.params, finetune.splits_at(config, jax.device_get(state.step)))

  return Task(init=make_init(config, model, tx, pretrained),
              train_step=make_train_step(config, model, tx, schedule,
                                         simla_train.batch_shards(config, mesh)),
              train_data=train_data, evaluate=evaluate,
              loss_keys=("loss",) + LOSSES)


# --------------------------------------------------------------------------- :eval
def evaluate_checkpoint(config, workdir: str) -> dict[str, float]:
  """Scores `init.checkpoint` on `eval.final_splits`; prints TR/IR, writes metrics.jsonl."""
  tokenizer = pipeline.make_tokenizer(config.data)
  pretrained = load_pretrained(config)
  model = build_model(config, tokenizer, pretrained)
  params = jax.tree.map(jnp.asarray, pretrained.params)
  splits = tuple(config.eval.final_splits)
  scores = make_evaluator(config, model, tokenizer, splits)(params)
  path = finetune.write_scores(workdir, pretrained.step, scores)
  if jax.process_index() == 0:
    print(format_table(scores, splits))
    print(f"Evaluated {pretrained.source} (step {pretrained.step}). Metrics: {path}",
          flush=True)
  return scores


def format_table(scores: Mapping[str, float], splits) -> str:
  cols = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean")
  lines = ["split   " + " ".join(f"{c:>7}" for c in cols)]
  for s in splits:
    lines.append(f"{s:<7} " + " ".join(f"{scores[f'{s}_{c}']:7.2f}" for c in cols))
    if f"{s}_pairs_itm_acc" in scores:
      lines.append(f"{'':7} minimal pairs: ITM {scores[f'{s}_pairs_itm_acc']:.1f} %, "
                   f"ITC {scores[f'{s}_pairs_itc_acc']:.1f} % (chance 50 %)")
  return "\n".join(lines)
