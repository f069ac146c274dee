"""The MvCoM face-recognition task for the generic loop: `make_task(config, mesh)`.

  steps.py            the model and the pure loss / step functions of every method
  synthetic_task.py   batches of the synthetic biased world   (config.data.name "synthetic")
  real_data_task.py   insightface packs with online variations (config.data.name "real")
  evaluators.py       per-group / per-variation verification, tables and plots
"""

from face_jax import real_data_task
from face_jax import steps as steps_lib
from face_jax import synthetic_task
from train_jax.task import Task


def make_task(config, mesh) -> Task:
  """The face task for `train_jax.loop.train_and_evaluate`."""
  del mesh  # shardings come from the logical axis names
  from train_jax import optimizers  # the loop's optimizer factory
  tx, schedule = optimizers.make_optimizer(config.optimizer, config.total_steps)
  return make_task_with(config, tx, schedule)


def make_task_with(config, tx, schedule) -> Task:
  """make_task with a given optimizer (tests, studies)."""
  steps_lib.check_config(config)
  if config.data.name == "synthetic":
    return synthetic_task.make_task(config, tx, schedule)
  if config.data.name == "real":
    return real_data_task.make_task(config, tx, schedule)
  raise ValueError(f"config.data.name={config.data.name!r}; known: synthetic, real")
