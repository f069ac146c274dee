"""A tiny SIMLA pretraining workdir (config.json + Orbax train state), written without training."""

import os

import flax.linen as nn
import jax

from configs import simla as simla_config
from simla_jax import train as simla_train
from simla_jax.data import mim_targets
from simla_jax.data import pipeline
from simla_jax.models import SIMLA
from train_jax import checkpoint as checkpoint_lib
from train_jax import optimizers

STEP = 7


def write_tiny_pretraining(workdir: str, seed: int = 0):
  """The state `simla_jax.train` initialises for configs/simla.py:tiny, saved at step 7."""
  cfg = simla_config.get_config("tiny")
  tokenizer = pipeline.make_tokenizer(cfg.data)
  targeter = mim_targets.MimTargeter(cfg.data.mim)
  model = SIMLA(simla_train.resolve_model_config(cfg, tokenizer, targeter))
  tx, _ = optimizers.make_optimizer(cfg.optimizer, cfg.total_steps)
  init = simla_train.make_init(cfg, model, tx, targeter)
  state = jax.jit(lambda k: nn.meta.unbox(init(k)))(jax.random.key(seed))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(cfg.to_json_best_effort(indent=2))
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1)
  ckpt.save(STEP, state, None)
  ckpt.close()
  return cfg, model, state
