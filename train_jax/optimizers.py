"""Optimizer factory: AdamW or SGD-momentum, path-regex weight-decay masks, schedules."""

import re
from typing import Sequence

import flax.linen as nn
import jax
import optax


def make_schedule(cfg, base_lr: float, total_steps: int) -> optax.Schedule:
  """Linear warmup from `warmup_init_lr`, then constant / cosine / polynomial / step decay.

  Decay spans the steps after warmup, so `total_steps` ends exactly at `end_lr`.
  """
  warmup = int(cfg.warmup_steps)
  decay_steps = max(total_steps - warmup, 1)
  name = cfg.name
  if name == "constant":
    after = optax.constant_schedule(base_lr)
  elif name == "cosine":
    after = optax.cosine_decay_schedule(base_lr, decay_steps, alpha=cfg.end_lr / base_lr if base_lr else 0.0)
  elif name == "polynomial":
    after = optax.polynomial_schedule(base_lr, cfg.end_lr, cfg.power, decay_steps)
  elif name == "step":
    # Boundaries are absolute step numbers in the config; shift them past warmup.
    after = optax.piecewise_constant_schedule(
        base_lr, {int(b) - warmup: cfg.decay for b in cfg.boundaries})
  else:
    raise ValueError(f"optimizer.schedule.name={name!r}; known: constant, cosine, polynomial, step")
  if warmup <= 0:
    return after
  ramp = optax.linear_schedule(cfg.warmup_init_lr, base_lr, warmup)
  return optax.join_schedules([ramp, after], [warmup])


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def decay_mask(params, no_decay: Sequence[str]):
  """True where weight decay applies: paths matching none of the `no_decay` regexes.

  Logically partitioned boxes keep their structure (optax may see boxed params
  during sharded init), and their path is the path of the box.
  """
  patterns = [re.compile(p) for p in no_decay]

  def decays(path, leaf):
    flag = not any(p.fullmatch(path_str(path)) for p in patterns)
    return leaf.replace_boxed(flag) if isinstance(leaf, nn.meta.AxisMetadata) else flag

  return jax.tree_util.tree_map_with_path(
      decays, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (tx, lr schedule). `cfg` is `config.optimizer` (see configs/common.py)."""
  schedule = make_schedule(cfg.schedule, cfg.lr, total_steps)
  mask = lambda params: decay_mask(params, cfg.no_decay)
  if cfg.name == "adamw":
    tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                     weight_decay=cfg.weight_decay, mask=mask)
  elif cfg.name == "sgd":
    # Coupled L2 decay as torch.optim.SGD does: added to the gradient before momentum.
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask),
                     optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
  else:
    raise ValueError(f"optimizer.name={cfg.name!r}; known: adamw, sgd")
  if cfg.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx, schedule
