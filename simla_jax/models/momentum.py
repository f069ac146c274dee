"""Momentum (EMA) copies of the SIMLA parameters and the ITC feature queues.

The official model keeps momentum copies of six modules (`model_pairs` in
models/simla/pretrain.py): the ViT, vision_proj, the BERT with its MLM head,
text_proj, mim_head and concept_head; itm_head and temp have none. The momentum
tree is the online tree restricted to those keys, so
`model.apply({"params": params_m}, ..., method=...)` runs the momentum model for
every method that only touches them.
"""

from typing import Any

import jax
import jax.numpy as jnp

MOMENTUM_MODULES = ("vit", "vision_proj", "bert", "text_proj", "mim_head", "concept_head")
# SIMLA's heads that ALBEF (`model.architecture="albef"`) does not have: copied when present.
SIMLA_ONLY = ("mim_head", "concept_head")


def init_momentum(params: Any) -> Any:
  """Momentum copies at initialisation: the online values of MOMENTUM_MODULES.

  Works on boxed (logically partitioned) or plain trees; JAX arrays are immutable,
  so sharing the leaves is a copy.
  """
  missing = [k for k in MOMENTUM_MODULES if k not in params and k not in SIMLA_ONLY]
  if missing:
    raise KeyError(f"init_momentum: params lack {missing}")
  return {k: params[k] for k in MOMENTUM_MODULES if k in params}


def ema_update(params_m: Any, params: Any, momentum: float | jax.Array) -> Any:
  """theta_m <- momentum * theta_m + (1 - momentum) * theta, over the keys of `params_m`."""
  online = {k: params[k] for k in params_m}
  return jax.tree.map(lambda m, p: (momentum * m + (1.0 - momentum) * p).astype(m.dtype),
                      params_m, online)


def init_queues(rng: jax.Array, queue_size: int, embed_dim: int) -> dict[str, jax.Array]:
  """ITC queues: {"image_queue", "text_queue"}: (queue_size, embed_dim) rows of unit
  length (standard normal, then normalized, as the official buffers), "queue_ptr": int32 ()."""
  k_image, k_text = jax.random.split(rng)

  def queue(key):
    q = jax.random.normal(key, (queue_size, embed_dim), jnp.float32)
    return q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
  return dict(image_queue=queue(k_image), text_queue=queue(k_text),
              queue_ptr=jnp.zeros((), jnp.int32))
