"""ALBEF (`configs/simla.py:albef`) in the pretraining step: ITC, ITM and MLM run and train
both stacks; MIM and PSL are not computed."""

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import numpy as np
import pytest

from configs import simla as simla_config
from simla_jax import train as simla_train
from simla_jax.models import simla as simla_lib


def _tiny_albef():
  c = simla_config.get_config("tiny")
  c.model.architecture = "albef"
  c.model.bert.fusion_start = 1            # tiny: 2 layers, 1 text + 1 fusion
  c.loss_weights.update(mim=0.0, psl=0.0)
  c.optimizer.update(name="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, grad_clip_norm=0.0)
  c.optimizer.schedule.update(name="constant", warmup_steps=0)
  return c


def test_albef_variant_keeps_the_default_depth_budget():
  default, albef = simla_config.get_config(), simla_config.get_config("albef")
  assert albef.model.architecture == "albef" and default.model.architecture == "simla"
  assert albef.model.bert.layers == default.model.bert.layers == 3
  assert simla_lib.fusion_start(albef.model) == 1          # 1 text layer + 2 fusion layers
  assert albef.loss_weights.mim == albef.loss_weights.psl == 0.0
  assert albef.loss_weights.itc == albef.loss_weights.itm == albef.loss_weights.mlm == 1.0
  rest = lambda c: {k: v for k, v in traverse_util.flatten_dict(c.to_dict()).items()
                    if k[0] != "loss_weights" and k[:2] not in (("model", "architecture"),)}
  assert rest(albef) == rest(default)                       # nothing else differs


def test_albef_step_runs_itc_itm_mlm_only():
  task = simla_train.make_task(_tiny_albef(), mesh=None)
  assert task.loss_keys == ("loss", "itc", "itm", "mlm")
  state = nn.meta.unbox(task.init(jax.random.key(0)))
  assert "mim_head" not in state.params and "concept_head" not in state.params
  before = jax.device_get(state.params)
  new, metrics = jax.jit(task.train_step)(state, next(task.train_data))
  metrics = jax.device_get(metrics)
  assert {"itc", "itm", "mlm", "itm_acc", "mlm_acc"} <= set(metrics)
  assert not {"mim", "mim_acc", "psl", "psl_keywords"} & set(metrics)
  np.testing.assert_allclose(metrics["loss"], metrics["itc"] + metrics["itm"] + metrics["mlm"],
                             rtol=1e-5)
  after = jax.device_get(new.params)
  moved = lambda *path: float(np.abs(traverse_util.flatten_dict(after)[path]
                                     - traverse_util.flatten_dict(before)[path]).max())
  # The text layer learns (ITC, and MLM / ITM through the fusion layer), the fusion layer's
  # cross-attention learns (ITM, MLM).
  assert moved("bert", "layer_0", "attention", "query", "kernel") > 0
  assert moved("bert", "layer_1", "crossattention", "query", "kernel") > 0
  assert ("bert", "layer_0", "crossattention", "query", "kernel") not in \
      traverse_util.flatten_dict(after)


def test_albef_with_a_mim_weight_is_refused():
  c = _tiny_albef()
  c.loss_weights.mim = 1.0
  task = simla_train.make_task(c, mesh=None)
  state = jax.eval_shape(lambda k: nn.meta.unbox(task.init(k)), jax.random.key(0))
  with pytest.raises(ValueError, match="'albef' has no image-query mode"):
    jax.eval_shape(task.train_step, state, next(task.train_data))
