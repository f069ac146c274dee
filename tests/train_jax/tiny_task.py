"""A tiny regression family used to test the generic loop (not part of the product)."""

import time

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import common
from train_jax import optimizers
from train_jax.state import TrainState
from train_jax.task import Task

IN, HIDDEN, OUT = 8, 32, 4


def get_config() -> ml_collections.ConfigDict:
  c = common.base()
  c.family = "tiny"
  c.batch_size = 8
  c.total_steps = 12
  c.log_every_steps = 2
  c.eval_every_steps = 6
  c.checkpoint_every_steps = 4
  c.keep_checkpoints = 3
  c.progress_bar = False
  c.optimizer.lr = 1e-2
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule.warmup_steps = 2
  c.num_examples = 64
  c.nan_at_step = -1          # the step whose loss becomes NaN (-1: never)
  c.data_delay_s = 0.0        # host sleep per example, to make steps slow in kill tests
  # From this many examples on the data source blocks forever (-1: never), after writing
  # the file `data_hang_marker`; examples are then made on the main thread.
  c.data_hang_at = -1
  c.data_hang_marker = ""
  c.dropout = 0.1
  c.hidden = HIDDEN           # model width: a resume with another value must be refused
  return c


class MLP(nn.Module):
  dropout: float
  hidden: int = HIDDEN

  @nn.compact
  def __call__(self, x, *, train: bool):
    part = nn.with_logical_partitioning
    x = nn.Dense(self.hidden, kernel_init=part(nn.initializers.lecun_normal(), ("embed", "mlp")),
                 bias_init=part(nn.initializers.zeros, ("mlp",)))(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(nn.gelu(x))
    return nn.Dense(OUT, kernel_init=part(nn.initializers.lecun_normal(), ("mlp", "embed")),
                    bias_init=part(nn.initializers.zeros, ("embed",)))(x)


_MADE = [0]


def _train_example(config, i):
  if 0 <= config.data_hang_at <= _MADE[0]:
    with open(config.data_hang_marker, "w") as f:
      f.write("hanging\n")
    while True:  # like a source that skips bad examples forever
      time.sleep(0.01)
  _MADE[0] += 1
  return _example(config, i)


def _example(config, i):
  if config.data_delay_s:
    time.sleep(config.data_delay_s)
  rng = np.random.default_rng([config.seed, int(i)])
  x = rng.normal(size=IN).astype(np.float32)
  w = np.linspace(-1, 1, IN * OUT, dtype=np.float32).reshape(IN, OUT)
  return {"x": x, "y": np.tanh(x @ w)}


def make_data(config):
  ds = (grain.MapDataset.range(config.num_examples)
        .shuffle(seed=config.seed).repeat()
        .map(lambda i: _train_example(config, i))
        .batch(config.batch_size // jax.process_count(), drop_remainder=True))
  hang = config.data_hang_at >= 0
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0) if hang else None))


def make_task(config, mesh) -> Task:
  del mesh
  model = MLP(config.dropout, config.hidden)
  tx, schedule = optimizers.make_optimizer(config.optimizer, config.total_steps)

  def init(rng):
    params = model.init(rng, jnp.zeros((1, IN)), train=False)["params"]
    return TrainState.create(params=params, tx=tx, rng=rng)

  def train_step(state, batch):
    rng, drop = jax.random.split(state.rng)

    def loss_fn(params):
      pred = model.apply({"params": params}, batch["x"], train=True, rngs={"dropout": drop})
      mse = jnp.mean((pred - batch["y"]) ** 2)
      poison = jnp.where(state.step + 1 == config.nan_at_step, jnp.nan, 1.0)
      return mse * poison, mse

    (loss, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(tx, grads, rng=rng)
    return state, {"loss": loss, "mse": mse, "lr": schedule(state.step - 1)}

  eval_x = np.stack([_example(config, 10_000 + i)["x"] for i in range(16)])
  eval_y = np.stack([_example(config, 10_000 + i)["y"] for i in range(16)])

  @jax.jit
  def eval_mse(params):
    return jnp.mean((model.apply({"params": params}, eval_x, train=False) - eval_y) ** 2)

  def evaluate(state):
    return {"mse": float(eval_mse(state.params))}

  return Task(init=init, train_step=train_step, train_data=make_data(config), evaluate=evaluate)
