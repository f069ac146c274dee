"""SIMLA pretrain step cost: compile time, step time, examples/s, FLOPs, MFU, memory.

  python benchmarks/bench_simla.py --size default [--batch 64] [--remat] [--dtype bfloat16]
      [--steps 10] [--mesh data=-1,fsdp=1,model=1] [--attention einsum|xla|cudnn]

Sizes: tiny (tests), default (configs/simla.py's CPU run), small (spec §7: ViT 6x384 @ 64 px,
BERT 6x384, vocab 30522, batch 8, queue 65536, 8192 codes), base (official, 256 px).
The step is the real one from simla_jax.train on synthetic batches of the right shapes.
"""

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.bench_matmul import peak_rate  # noqa: E402
from configs import simla as simla_config  # noqa: E402
from configs import simla_model  # noqa: E402
from simla_jax import train as simla_train  # noqa: E402
from simla_jax.data import mim_targets, pipeline  # noqa: E402
from simla_jax.models import SIMLA  # noqa: E402
from train_jax import optimizers, sharding  # noqa: E402


def make_config(size: str, batch: int | None):
  if size in ("tiny", "default"):
    c = simla_config.get_config("tiny" if size == "tiny" else None)
  else:
    c = simla_config.get_config(None)
    c.model = simla_model.model_config(size)
    c.data.image_size = c.model.image_size
    c.data.mim.update(codebook_size=8192, target="random_projection")
    c.model.codebook_size = 8192
    if size == "small":
      c.batch_size, c.queue_size, c.data.max_len = 8, 65536, 30
      c.data.mim.update(num_masking_patches=5, min_num_patches=2)
    else:
      c.batch_size, c.queue_size, c.data.max_len = 64, 65536, 30
      c.data.mim.update(num_masking_patches=75, min_num_patches=16)
  if batch:
    c.batch_size = batch
    c.queue_size = max(c.queue_size // batch, 1) * batch
  return c


class _Vocab:
  """Tokenizer stand-in for sizes whose vocabulary is BERT's (no vocab.txt needed)."""
  pad_id, unk_id, cls_id, sep_id, mask_id = 0, 100, 101, 102, 103

  def __init__(self, size):
    self.vocab_size = size


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="default", choices=["tiny", "default", "small", "base"])
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--remat", action="store_true")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--attention", default="einsum")
  p.add_argument("--mesh", default="data=-1,fsdp=1,model=1")
  args = p.parse_args()

  c = make_config(args.size, args.batch)
  c.model.remat, c.model.dtype, c.model.attention_impl = args.remat, args.dtype, args.attention
  c.mesh.update({k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))})
  tokenizer = (pipeline.make_tokenizer(c.data) if c.model.bert.vocab_size == -1
               else _Vocab(c.model.bert.vocab_size))
  targeter = mim_targets.MimTargeter(c.data.mim)
  if c.model.bert.vocab_size == -1:
    c.model.bert.vocab_size = tokenizer.vocab_size
  c.model.codebook_size = targeter.vocab_size
  model = SIMLA(c.model)
  tx, schedule = optimizers.make_optimizer(c.optimizer, c.total_steps)
  step = simla_train.make_train_step(c, model, tx, schedule, tokenizer, targeter)

  mesh = sharding.make_mesh(c.mesh)
  task_init = simla_train.make_init(c, model, tx, targeter)
  state, shardings = sharding.sharded_init(task_init, mesh, c.axis_rules, jax.random.key(0))
  b, s, l = c.batch_size, c.data.image_size, c.data.max_len
  n = (s // c.model.patch_size) ** 2
  rng = np.random.default_rng(0)
  mask = np.zeros((b, n), bool)
  mask[:, :max(1, c.data.mim.num_masking_patches)] = True
  batch = dict(image=rng.normal(size=(b, s, s, 3)).astype(np.float32),
               text_ids=rng.integers(5, tokenizer.vocab_size, (b, l)).astype(np.int32),
               text_mask=np.ones((b, l), np.int32), patch_mask=mask)
  batch["text_ids"][:, 0] = tokenizer.cls_id
  with jax.set_mesh(mesh):
    batch = sharding.global_batch(batch, mesh)
    jitted = jax.jit(step, out_shardings=(shardings, None), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0))
    times = []
    for i in range(args.steps + 2):
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics["loss"])
      if i >= 2:
        times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  peak = peak_rate(jax.numpy.dtype(args.dtype)) * jax.device_count()
  mem = jax.devices()[0].memory_stats() or {}
  peak_mem = mem.get("peak_bytes_in_use", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
  rows = [("size", args.size), ("batch", b), ("devices", jax.device_count()),
          ("dtype", args.dtype), ("remat", args.remat), ("attention", args.attention),
          ("params (online)", f"{sum(x.size for x in jax.tree.leaves(state.params)) / 1e6:.2f} M"),
          ("compile s", f"{compile_s:.1f}"), ("step s (median)", f"{step_s:.4f}"),
          ("examples/s", f"{b / step_s:.1f}"), ("GFLOP/step (XLA)", f"{flops / 1e9:.2f}"),
          ("achieved TFLOP/s", f"{flops / step_s / 1e12:.4f}"),
          ("matmul peak TFLOP/s", f"{peak / 1e12:.4f}"), ("MFU", f"{flops / step_s / peak:.1%}"),
          ("peak memory GB", f"{peak_mem / 2**30:.2f}"), ("loss", f"{float(metrics['loss']):.3f}")]
  for k, v in rows:
    print(f"{k:>22}  {v}")


if __name__ == "__main__":
  main()
