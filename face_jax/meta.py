"""Learning to learn from a held-out meta set: MvCoM's bilevel step and L2RW weights.

Both are written against closures, so they know nothing about the face model:

  train_loss(theta, phi) -> scalar   the training-batch loss with margins m(phi)
  meta_loss(theta) -> scalar         the plain (fixed-margin) loss on a meta batch

MvCoM (specs/mvcom.md §1.6, MW-Net pattern): virtual SGD step
theta'(phi) = theta - lr * grad_theta train_loss(theta, phi), meta objective
meta_loss(theta'(phi)), and its gradient in phi through the virtual step. That gradient is
second order (-lr * d/dphi <grad_theta train_loss, grad meta_loss(theta')>): dropping
d theta'/d phi, the MAML "first-order" shortcut, leaves phi with no gradient at all,
because phi enters the meta objective only through theta'.

L2RW (Ren et al. 2018, §4.8): per-example weights eps = 0, virtual step with step size 1,
weights = max(-d meta_loss / d eps, 0) normalised to sum 1. At eps = 0 the virtual
parameters equal theta, so -d meta_loss/d eps_i = <grad l_i(theta), grad meta_loss(theta)>:
one forward-mode product of the per-example losses along the meta gradient.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

Params = Any


def sgd_lookahead(params: Params, grads: Params, lr) -> Params:
  """theta - lr * g, leaf by leaf (plain SGD: no momentum, no weight decay)."""
  return jax.tree.map(lambda p, g: p - lr * g.astype(p.dtype), params, grads)


def lookahead_meta_loss(phi: Params, theta: Params,
                        train_loss: Callable[[Params, Params], jax.Array],
                        meta_loss: Callable[[Params], Any], lr):
  """meta_loss(theta - lr * grad_theta train_loss(theta, phi)); differentiable in phi.
  Returns what meta_loss returns (a scalar, or (scalar, aux) for value_and_grad's has_aux)."""
  grads = jax.grad(train_loss)(theta, phi)
  return meta_loss(sgd_lookahead(theta, grads, lr))


def lookahead_meta_grad(phi: Params, theta: Params,
                        train_loss: Callable[[Params, Params], jax.Array],
                        meta_loss: Callable[[Params], jax.Array], lr):
  """(meta loss at the virtual parameters, its gradient w.r.t. phi)."""
  return jax.value_and_grad(lookahead_meta_loss)(phi, theta, train_loss, meta_loss, lr)


def _normalise_nonnegative(scores: jax.Array) -> jax.Array:
  w = jnp.maximum(scores, 0.0)
  total = jnp.sum(w)
  return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)


def l2rw_weights(theta: Params, per_example_loss: Callable[[Params], jax.Array],
                 meta_loss: Callable[[Params], jax.Array]) -> jax.Array:
  """L2RW weights (b,): clamp(<grad l_i, grad meta_loss>, 0) / sum, stop-gradient.

  per_example_loss(theta) -> (b,) unweighted training losses.
  """
  meta_grad = jax.grad(meta_loss)(theta)
  _, scores = jax.jvp(per_example_loss, (theta,), (meta_grad,))
  return jax.lax.stop_gradient(_normalise_nonnegative(scores))


def l2rw_weights_lookahead(theta: Params, per_example_loss: Callable[[Params], jax.Array],
                           meta_loss: Callable[[Params], jax.Array]) -> jax.Array:
  """The same weights by the explicit virtual step (the reference's 'legacy' path).

  Slower (a gradient through a gradient); kept to check `l2rw_weights`.
  """
  size = jax.eval_shape(per_example_loss, theta).shape

  def meta_of_eps(eps):
    grads = jax.grad(lambda t: jnp.sum(eps * per_example_loss(t)))(theta)
    return meta_loss(sgd_lookahead(theta, grads, 1.0))

  scores = -jax.grad(meta_of_eps)(jnp.zeros(size, jnp.float32))
  return jax.lax.stop_gradient(_normalise_nonnegative(scores))
