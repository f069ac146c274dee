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


def write_tiny_pretraining(workdir: str, seed: int = 0, albef: bool = False):
  """The state `simla_jax.train` initialises for configs/simla.py:tiny, saved at step 7;
  `albef`: its ALBEF layout (1 text + 1 fusion layer, ITC / ITM / MLM)."""
  cfg = simla_config.get_config("tiny")
  if albef:
    cfg.model.architecture = "albef"
    cfg.model.bert.fusion_start = -1
    cfg.loss_weights.update(mim=0.0, psl=0.0)
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


def write_official_pth(workdir: str, state, data_cfg, path: str):
  """The workdir's train `state` saved as an official SIMLA .pth at `path` (through the
  converter); returns the model config an official checkpoint is loaded with."""
  import torch   # only the tests that need it import torch
  from simla_jax import convert
  from simla_jax.tasks import retrieval as rt
  tokenizer = pipeline.make_tokenizer(data_cfg)
  model_cfg = rt.resolve_model_config(rt.workdir_model_config(workdir), tokenizer, state.params)
  model_cfg.codebook_size = state.params["mim_head"]["kernel"].shape[1]
  queues = {k: state.extras[k] for k in ("image_queue", "text_queue", "queue_ptr")}
  official = convert.to_official_state_dict(state.params, state.extras["momentum"], queues,
                                            model_cfg)
  torch.save({"model": {k: torch.from_numpy(v) for k, v in official.items()}}, path)
  return model_cfg
