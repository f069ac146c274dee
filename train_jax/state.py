"""The train state: one pytree the loop shards, checkpoints and threads through steps."""

from typing import Any

import flax.struct
import jax
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from step to step.

  `extras` holds what a family needs beyond params and optimizer state: EMA
  (momentum) params, feature queues, meta-parameters and their optimizer state,
  BatchNorm statistics. It is a dict so families add entries without subclassing.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  extras: dict[str, Any] = flax.struct.field(default_factory=dict)

  @classmethod
  def create(cls, *, params, tx: optax.GradientTransformation, rng, extras=None):
    return cls(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
               opt_state=tx.init(params), rng=rng, extras=dict(extras or {}))

  def apply_gradients(self, tx: optax.GradientTransformation, grads, **changes):
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **changes)
