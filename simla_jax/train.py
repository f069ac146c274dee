"""SIMLA pretraining as a `train_jax` task: ITC + ITM + MLM + MIM + PSL (spec §2).

One jitted step runs the online and momentum models over the global batch:
  online    ViT (plain and block-masked), BERT text mode, one multimodal pass over
            3B pairs (positives + both hard negatives), MLM pass, image-query pass;
  momentum  EMA-updated first (as the official forward does), then the same encoders
            without gradient, plus the PSL pass that returns attention probabilities.
Evaluation is zero-shot retrieval (ITC candidates re-ranked by ITM) on held-out splits.
"""

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simla_jax import objectives as obj
from simla_jax import pretrained
from simla_jax import retrieval
from simla_jax.data import masks as masks_lib
from simla_jax.data import mim_targets
from simla_jax.data import pipeline
from simla_jax.models import SIMLA, ema_update, init_momentum, init_params, init_queues
from train_jax import optimizers
from train_jax import sharding
from train_jax.state import TrainState
from train_jax.task import Task

LOSSES = ("itc", "itm", "mlm", "mim", "psl")


def resolve_model_config(config, tokenizer, targeter) -> ml_collections.ConfigDict:
  """`config.model` with -1 sizes taken from the data (vocabulary, codebook)."""
  m = ml_collections.ConfigDict(config.model.to_dict())
  if m.bert.vocab_size == -1:
    m.bert.vocab_size = tokenizer.vocab_size
  if m.codebook_size == -1:
    m.codebook_size = targeter.vocab_size
  if m.bert.vocab_size != tokenizer.vocab_size:
    raise ValueError(f"model.bert.vocab_size {m.bert.vocab_size} != the tokenizer's "
                     f"{tokenizer.vocab_size} (set it to -1 to follow the data)")
  if m.codebook_size != targeter.vocab_size:
    raise ValueError(f"model.codebook_size {m.codebook_size} != data.mim targets' "
                     f"{targeter.vocab_size} (set it to -1 to follow the data)")
  if m.image_size != config.data.image_size or m.patch_size != config.data.mim.patch_size:
    raise ValueError(f"model.image_size/patch_size ({m.image_size}/{m.patch_size}) must equal "
                     f"data.image_size/mim.patch_size ({config.data.image_size}/"
                     f"{config.data.mim.patch_size})")
  return m


NEGATIVES_FROM = ("device", "global")


def batch_shards(config, mesh) -> int:
  """Blocks of the global batch that ITM negatives are drawn within: the data-parallel
  shards for itm.negatives_from="device" (the official per-GPU sampling), else 1."""
  itm = config.get("itm") or {}
  if itm.get("negatives_from", "global") == "global" or mesh is None:
    return 1
  return int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES if a in mesh.shape]))


def check_config(config, mesh=None) -> None:
  itm = config.get("itm") or {}
  if itm.get("negatives_from", "global") not in NEGATIVES_FROM:
    raise ValueError(f"itm.negatives_from {itm.negatives_from!r}: choose one of {NEGATIVES_FROM}")
  if not 0.0 <= itm.get("random_negatives", 0.0) <= 1.0:
    raise ValueError(f"itm.random_negatives {itm.random_negatives} must lie in [0, 1]")
  shards = batch_shards(config, mesh)
  if shards > 1 and config.batch_size // shards < 2:
    raise ValueError(f"itm.negatives_from='device' draws ITM negatives within each of the "
                     f"{shards} data-parallel shards, which needs batch_size >= {2 * shards} "
                     f"(got {config.batch_size}); or set itm.negatives_from='global'")
  unknown = set(config.loss_weights) - set(LOSSES)
  if unknown:
    raise ValueError(f"loss_weights: unknown losses {sorted(unknown)}; known: {LOSSES}")
  if config.queue_size % config.batch_size:
    raise ValueError(f"queue_size {config.queue_size} must be a multiple of the global "
                     f"batch_size {config.batch_size}")
  if config.batch_size % jax.process_count():
    raise ValueError(f"batch_size {config.batch_size} must divide over "
                     f"{jax.process_count()} processes")


def make_train_step(config, model: SIMLA, tx, schedule, tokenizer, targeter, shards: int = 1):
  """Returns the pure `(state, batch) -> (state, metrics)` pretraining step.

  `shards` (`batch_shards`): ITM negatives are drawn within each of that many blocks of the
  global batch (the data-parallel shards).
  """
  weights = {k: float(config.loss_weights.get(k, 0.0)) for k in LOSSES}
  random_negatives = float((config.get("itm") or {}).get("random_negatives", 0.0))
  mcfg = model.config
  psl = config.psl
  # ALBEF: ITM's fusion layers read the text layers' output of the ITC pass (as ALBEF does).
  albef = mcfg.get("architecture", "simla") == "albef"

  def run(params, method, *args, rng=None, **kwargs):
    """Applies one SIMLA method; an `rng` means train mode (dropout on)."""
    if rng is not None:
      kwargs.update(deterministic=False, rngs={"dropout": rng})
    return model.apply({"params": params}, *args, method=method, **kwargs)

  def train_step(state: TrainState, batch):
    rng, *keys = jax.random.split(state.rng, 12)
    key = iter(keys)
    alpha = obj.alpha_at(state.step, config.alpha, config.alpha_warmup_steps)
    images, ids, mask = batch["image"], batch["text_ids"], batch["text_mask"]
    patch_mask = batch["patch_mask"]
    b = ids.shape[0]

    # The official forward updates the momentum copies before it uses them.
    params_m = ema_update(state.extras["momentum"], state.params, mcfg.momentum)
    k_m = next(key)
    image_seq_m = run(params_m, SIMLA.embed_image, images, rng=jax.random.fold_in(k_m, 0))
    img_m = run(params_m, SIMLA.image_feature, image_seq_m)
    txt_m = run(params_m, SIMLA.text_feature,
                run(params_m, SIMLA.embed_text, ids, mask, rng=jax.random.fold_in(k_m, 1),
                    cls_only=True))
    masked_ids, mlm_labels = masks_lib.mlm_mask(
        ids, next(key), vocab_size=tokenizer.vocab_size, mask_id=tokenizer.mask_id,
        pad_id=tokenizer.pad_id, cls_id=tokenizer.cls_id, probability=config.data.mlm.probability,
        mask_frac=config.data.mlm.mask_frac, random_frac=config.data.mlm.random_frac)
    k_neg, k_mlm, k_mim, k_psl, k_online = (next(key) for _ in range(5))

    def loss_fn(params):
      drop = lambda i: jax.random.fold_in(k_online, i)
      temp = obj.clamp_temperature(params["temp"], mcfg.temp_min, mcfg.temp_max)
      image_seq = run(params, SIMLA.embed_image, images, rng=drop(0))
      img = run(params, SIMLA.image_feature, image_seq)
      text_seq = run(params, SIMLA.embed_text, ids, mask, rng=drop(1), cls_only=not albef)
      txt = run(params, SIMLA.text_feature, text_seq)
      losses, stats = {}, {}

      itc, sim_i2t, sim_t2i = obj.itc_loss(img, txt, img_m, txt_m, state.extras["image_queue"],
                                           state.extras["text_queue"], temp, alpha)
      losses["itc"] = itc

      if weights["itm"]:
        neg_text, neg_image = obj.sample_hard_negatives(k_neg, sim_i2t[:, :b], sim_t2i[:, :b],
                                                        shards=shards,
                                                        random_fraction=random_negatives)
        # One multimodal pass over 3B pairs: (text, image), (text, its negative image),
        # (negative text, image).
        ids3 = jnp.concatenate([ids, ids, ids[neg_text]])
        mask3 = jnp.concatenate([mask, mask, mask[neg_text]])
        rows = jnp.arange(b)
        image3 = jnp.concatenate([rows, neg_image, rows])
        # share_image_kv: each image's keys/values projected once, then gathered per pair.
        kv, kv_index = ((image_seq, image3) if config.share_image_kv
                        else (image_seq[image3], None))
        if albef:
          text3 = jnp.concatenate([text_seq, text_seq, text_seq[neg_text]])
          fused3 = run(params, SIMLA.fuse_text, text3, mask3, kv, image_index=kv_index,
                       rng=drop(2), cls_only=True)
        else:
          fused3 = run(params, SIMLA.fuse, ids3, mask3, kv, image_index=kv_index, rng=drop(2),
                       cls_only=True)
        losses["itm"], stats["itm_acc"] = obj.itm_loss(run(params, SIMLA.itm_logits, fused3))

      if weights["mlm"]:
        fused = run(params, SIMLA.fuse, masked_ids, mask, image_seq, rng=drop(3))
        fused_m = run(params_m, SIMLA.fuse, masked_ids, mask, image_seq_m, rng=k_mlm)

        def mlm_full(fused, fused_m):
          return obj.mlm_loss(run(params, SIMLA.mlm_logits, fused),
                              run(params_m, SIMLA.mlm_logits, fused_m), mlm_labels, alpha,
                              distill_over_sequence=config.compat.mlm_distill_over_sequence)

        cap = config.mlm_capacity
        if not cap.capacity or config.compat.mlm_distill_over_sequence:
          losses["mlm"], stats["mlm_acc"] = mlm_full(fused, fused_m)
        else:
          # The vocabulary logits only where a token is masked: per group of rows, the
          # first `capacity` masked positions; a group with more takes the full path.
          index, labels_at, fits = obj.masked_positions(mlm_labels, cap.group_rows,
                                                        cap.capacity)

          def mlm_masked(fused, fused_m):
            at = lambda x: obj.gather_positions(x, index, cap.group_rows)
            return obj.mlm_loss(run(params, SIMLA.mlm_logits, at(fused)),
                                run(params_m, SIMLA.mlm_logits, at(fused_m)), labels_at, alpha)
          losses["mlm"], stats["mlm_acc"] = jax.lax.cond(fits, mlm_masked, mlm_full,
                                                         fused, fused_m)
          stats["mlm_in_capacity"] = fits.astype(jnp.float32)   # 1: the cheap path ran

      if weights["mim"]:
        targets = targeter(state.extras["mim_target"], batch)
        masked_seq = run(params, SIMLA.embed_image, images, patch_mask, rng=drop(4))
        query = run(params, SIMLA.fuse_image_query, masked_seq, ids, mask, rng=drop(5))
        # The official momentum branch cross-attends to the ONLINE token embeddings.
        tokens = jax.lax.stop_gradient(
            run(params, SIMLA.token_embeddings, ids, rng=jax.random.fold_in(k_mim, 0)))
        masked_seq_m = run(params_m, SIMLA.embed_image, images, patch_mask,
                           rng=jax.random.fold_in(k_mim, 1))
        query_m = run(params_m, SIMLA.fuse_image_query, masked_seq_m, None, mask,
                      token_embeds=tokens, rng=jax.random.fold_in(k_mim, 2))
        losses["mim"], stats["mim_acc"] = obj.mim_loss(
            run(params, SIMLA.mim_logits, query), run(params_m, SIMLA.mim_logits, query_m),
            targets, patch_mask, alpha)

      if weights["psl"]:
        _, attn = run(params_m, SIMLA.fuse_with_attention, ids, mask,
                      jax.lax.stop_gradient(image_seq), layer=psl.layer, rng=k_psl,
                      cls_only=True)
        keywords = obj.psl_keywords(attn[:, :, 0, :], ids, tokenizer.vocab_size,
                                    psl.per_head, psl.num_keywords, tokenizer.cls_id)
        losses["psl"] = obj.psl_loss(run(params, SIMLA.concept_logits, img),
                                     run(params_m, SIMLA.concept_logits, img_m), keywords, alpha)
        stats["psl_keywords"] = keywords.sum(-1).mean()

      total = sum(weights[k] * v for k, v in losses.items() if weights[k])
      return total, (losses, stats)

    (loss, (losses, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new = state.apply_gradients(tx, grads, rng=rng)
    params = {**new.params, "temp": jnp.clip(new.params["temp"], mcfg.temp_min, mcfg.temp_max)}
    extras = dict(state.extras, momentum=params_m)
    ptr = state.extras["queue_ptr"]
    extras["image_queue"], _ = obj.enqueue(state.extras["image_queue"], img_m, ptr)
    extras["text_queue"], extras["queue_ptr"] = obj.enqueue(state.extras["text_queue"], txt_m, ptr)
    metrics = dict(loss=loss, **losses, **stats, alpha=alpha, temp=params["temp"],
                   lr=schedule(state.step))
    return new.replace(params=params, extras=extras), metrics

  return train_step


RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


def check_rng_impl(impl: str) -> str:
  if impl not in RNG_IMPLS:
    raise ValueError(f"rng_impl {impl!r}: choose one of {RNG_IMPLS}")
  return impl


def state_key(rng: jax.Array, impl: str) -> jax.Array:
  """A key of PRNG implementation `impl` drawn from `rng` (the run's seed key): the state's
  key, which every dropout mask, MLM mask and ITM negative of the run derives from."""
  if str(jax.random.key_impl(rng)) == check_rng_impl(impl):
    return rng
  return jax.random.key(jax.random.bits(rng, (), jnp.uint32), impl=impl)


def make_init(config, model: SIMLA, tx, targeter, public_weights=None):
  """rng -> TrainState with params, momentum copies, ITC queues and frozen MIM targets.

  `public_weights` ({Flax path: array}, `pretrained.load_public_weights`) replace the
  random values before the momentum copies are taken (momentum = online at step 0).
  """

  def init(rng):
    k_params, k_queues, k_state = jax.random.split(rng, 3)
    params = pretrained.with_weights(init_params(model, k_params), public_weights or {})
    extras = dict(momentum=init_momentum(params),
                  mim_target=jax.tree.map(jnp.asarray, targeter.init_state()),
                  **init_queues(k_queues, config.queue_size, model.config.embed_dim))
    k_state = state_key(k_state, config.get("rng_impl", "threefry2x32"))
    return TrainState.create(params=params, tx=tx, rng=k_state, extras=extras)

  return init


def make_task(config, mesh) -> Task:
  # Parameter shardings come from their logical axis names; the mesh sets the ITM blocks.
  check_config(config, mesh)
  check_rng_impl(config.get("rng_impl", "threefry2x32"))
  init_cfg = config.get("init") or pretrained.init_config()
  pretrained.check_files(init_cfg)     # before any data is read: a missing file is named
  tokenizer = pipeline.make_tokenizer(config.data)
  targeter = mim_targets.MimTargeter(config.data.mim)
  model = SIMLA(resolve_model_config(config, tokenizer, targeter))
  tx, schedule = optimizers.make_optimizer(config.optimizer, config.total_steps)
  init = make_init(config, model, tx, targeter,
                   pretrained.load_public_weights(init_cfg, model.config))
  train_data = pipeline.make_train_iterator(
      config.data, batch_size=config.batch_size // jax.process_count(), tokenizer=tokenizer)
  evaluator = retrieval.Evaluator(model, config.eval, config.data, tokenizer)

  def evaluate(state):
    return evaluator(state.params)

  def finish(state, workdir):
    from simla_jax import plots
    main = jax.process_index() == 0
    # Every process scores the grid (the params may span other hosts' devices); 0 writes.
    plots.retrieval_grid(evaluator, state.params,
                         os.path.join(workdir, "retrieval.png") if main else None)
    if main:
      plots.loss_curves(workdir, LOSSES, os.path.join(workdir, "losses.png"))
      print(f"Plots: {workdir}/losses.png, {workdir}/retrieval.png")

  return Task(init=init,
              train_step=make_train_step(config, model, tx, schedule, tokenizer, targeter,
                                         shards=batch_shards(config, mesh)),
              train_data=train_data, evaluate=evaluate, finish=finish,
              loss_keys=("loss",) + tuple(k for k in LOSSES if config.loss_weights.get(k)))
