"""Logical sharding: SIMLA initialised on an 8-device (fsdp=4, model=2) mesh computes the
same function as on one device, with its parameters actually split."""

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from configs.common import AXIS_RULES
from simla_jax.models import SIMLA, init_params
from simla_torch_refs import ref_config, rel_err
from train_jax import sharding


def test_sharded_init_and_apply_match_one_device():
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  cfg = ref_config()
  model = SIMLA(cfg)
  mesh = sharding.make_mesh(dict(data=1, fsdp=4, model=2))
  params, shardings = sharding.sharded_init(lambda r: init_params(model, r), mesh, AXIS_RULES,
                                            jax.random.key(0))
  word = params["bert"]["embeddings"]["word_embeddings"]["embedding"]
  assert word.sharding.spec == P("model", "fsdp")                     # (vocab, embed)
  assert {s.data.shape for s in word.addressable_shards} == {(word.shape[0] // 2, word.shape[1] // 4)}
  fc1 = params["vit"]["block_0"]["mlp"]["fc1"]["kernel"]
  assert fc1.sharding.spec == P("fsdp", "model")                      # (embed, mlp)
  assert shardings["bert"]["layer_0"]["attention"]["query"]["kernel"].spec == P("fsdp", "model", None)

  rng = np.random.default_rng(0)
  images = rng.standard_normal((4, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  ids = rng.integers(1, cfg.bert.vocab_size, (4, 6)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 3:] = 0
  patch_mask = rng.random((4, (cfg.image_size // cfg.patch_size) ** 2)) < 0.3

  def forward(p, *batch):
    return model.apply({"params": p}, *batch)
  with jax.set_mesh(mesh):
    batch = [jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
             for x in (images, ids, mask, patch_mask)]
    sharded = jax.jit(forward)(params, *batch)
  host_params = jax.device_get(params)
  single = jax.jit(forward)(jax.device_put(host_params, jax.devices()[0]),
                            images, ids, mask, patch_mask)
  assert len(single["fused"].devices()) == 1
  errs = {k: rel_err(sharded[k], single[k]) for k in single if np.ndim(single[k])}
  print("sharded vs one device (max rel err): "
        + ", ".join(f"{k} {v:.1e}" for k, v in sorted(errs.items())))
  assert max(errs.values()) < 1e-5, errs
