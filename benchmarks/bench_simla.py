"""SIMLA pretrain step cost: compile time, step time, examples/s, FLOPs, MFU, memory.

  python benchmarks/bench_simla.py --size small [--batch 8] [--steps 10]
      [--remat [--remat_policy dots_with_no_batch_dims_saveable]] [--dtype bfloat16]
      [--scan | --no-scan]
      [--attention einsum|xla|cudnn] [--mesh data=-1,fsdp=1,model=1]
      [--prng threefry2x32|philox4x32|rbg|unsafe_rbg|...] [--mim_target random_projection|dvae]
      [--memory_only] [--compare_itm] [--out benchmarks/results.jsonl]

Sizes: tiny (configs/simla.py's test size), default (configs/simla.py's CPU run), small
(specs/simla.md §7: ViT 6x384 @ 64 px, BERT 6x384, vocab 30522, batch 8, text 30,
queue 65536, 8192 codes), base (official, 256 px, batch 64).
The step is the real one from simla_jax.train.make_train_step on synthetic batches of
the right shapes, jitted as the loop jits it (state donated, out_shardings).

Reported: lowering seconds (trace + StableHLO) and XLA compile seconds, separately;
median step wall seconds and process CPU seconds (the share
of the cores the step got on a shared machine is CPU / wall); examples/s; FLOPs per step
from XLA's cost analysis of the compiled step (executed, remat recomputation included)
and of the same step without remat (the model FLOPs MFU counts) -- with `--scan` both
are counted on the unrolled step, lowered only, since XLA counts a scan's body once; MFU / HFU against the
matmul rate measured in this process (benchmarks/bench_matmul.py); XLA's buffer
assignment (arguments + outputs - donated + temporaries) and the peak memory seen
(device allocator, or the process's max RSS on CPU); the load average before and after.

--memory_only compiles against abstract inputs (nothing allocated, nothing run) and
prints XLA's buffer assignment for this backend. --residuals only traces: train state +
gradients + the activations the backward pass keeps (the pullback's residuals), a
backend-independent estimate of the memory at the forward/backward boundary. Both are
how the `base` batch-64 memory is estimated without a GPU.
--compare_itm times the ITM positives and both negative sets as one 3B multimodal pass
(what the step does) against three B passes, forward and backward.
Ablation flags (not the training recipe): --loss_weights, --dropout.
"""

import argparse
import ast
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.bench_matmul import peak_rate  # noqa: E402
from configs import simla as simla_config  # noqa: E402
from configs import simla_model  # noqa: E402
from simla_jax import train as simla_train  # noqa: E402
from simla_jax.data import dvae, mim_targets, pipeline  # noqa: E402
from simla_jax.models import SIMLA  # noqa: E402
from simla_jax.models import layers  # noqa: E402
from train_jax import optimizers, sharding  # noqa: E402

SIZES = ("tiny", "default", "small", "base")


def make_config(size: str, batch: int | None, mim_target: str = "random_projection"):
  """The run config of a named size; `batch` overrides the global batch (queue rounded)."""
  if size in ("tiny", "default"):
    c = simla_config.get_config("tiny" if size == "tiny" else None)
  else:
    c = simla_config.get_config(None)
    c.model = simla_model.model_config(size)
    c.data.image_size = c.model.image_size
    c.data.mim.update(codebook_size=8192, target="random_projection")
    c.model.codebook_size = 8192
    c.queue_size, c.data.max_len = 65536, 30
    if size == "small":
      c.batch_size = 8
      c.data.mim.update(num_masking_patches=5, min_num_patches=2)
    else:
      c.batch_size = 64
      c.data.mim.update(num_masking_patches=75, min_num_patches=16)
  if mim_target == "dvae":    # the official targets: the dVAE on a half-resolution view
    c.data.mim.update(target="dvae", dvae_image_size=c.data.image_size // 2)
  if batch:
    c.batch_size = batch
    c.queue_size = max(c.queue_size // batch, 1) * batch
  return c


class _Vocab:
  """Tokenizer stand-in for sizes whose vocabulary is BERT's (no vocab.txt needed)."""
  pad_id, unk_id, cls_id, sep_id, mask_id = 0, 100, 101, 102, 103

  def __init__(self, size):
    self.vocab_size = size


class _RandomDvaeTargeter(mim_targets.MimTargeter):
  """dVAE MIM targets from a randomly initialised encoder (same cost as the real one)."""

  def init_state(self, dvae_params=None, channels: int = 3) -> dict:
    return super().init_state(dvae.random_params(self.cfg) if dvae_params is None
                              else dvae_params, channels)


def override(c, item: str) -> None:
  """Sets `a.b.c=value` (a Python literal, else a string) in config `c`."""
  key, _, value = item.partition("=")
  try:
    value = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    pass
  *parents, leaf = key.split(".")
  for name in parents:
    if name not in c:
      c[name] = ml_collections.ConfigDict()
    c = c[name]
  c[leaf] = value


def build(c, tokenizer=None, targeter=None):
  """(tokenizer, targeter, model, train_step, init) for a run config; fills -1 sizes."""
  if tokenizer is None:
    tokenizer = (pipeline.make_tokenizer(c.data) if c.model.bert.vocab_size == -1
                 else _Vocab(c.model.bert.vocab_size))
  if targeter is None:
    targeter = (_RandomDvaeTargeter if c.data.mim.target == "dvae"
                else mim_targets.MimTargeter)(c.data.mim)
  c.model.bert.vocab_size = tokenizer.vocab_size
  c.model.codebook_size = targeter.vocab_size
  model = SIMLA(c.model)
  tx, schedule = optimizers.make_optimizer(c.optimizer, c.total_steps)
  step = simla_train.make_train_step(c, model, tx, schedule, tokenizer, targeter)
  return tokenizer, targeter, model, step, simla_train.make_init(c, model, tx, targeter)


def synthetic_batch(c, tokenizer, seed: int = 0) -> dict[str, np.ndarray]:
  """A global batch with the pipeline's keys, shapes and dtypes (simla_jax.data)."""
  b, s, l = c.batch_size, c.data.image_size, c.data.max_len
  n = (s // c.model.patch_size) ** 2
  rng = np.random.default_rng(seed)
  mask = np.zeros((b, n), bool)
  mask[:, :max(1, c.data.mim.num_masking_patches)] = True
  batch = dict(image=rng.normal(size=(b, s, s, 3)).astype(np.float32),
               text_ids=rng.integers(5, tokenizer.vocab_size, (b, l)).astype(np.int32),
               text_mask=np.ones((b, l), np.int32), patch_mask=mask)
  batch["text_ids"][:, 0] = tokenizer.cls_id
  if c.data.mim.target == "dvae":
    d = c.data.mim.dvae_image_size
    batch["dvae_image"] = rng.uniform(0.1, 0.9, (b, d, d, 3)).astype(np.float32)
  return batch


def abstract_inputs(init, batch, mesh, rules):
  """ShapeDtypeStructs (with shardings) of the train state and the batch: lower and
  compile without allocating anything."""
  boxed = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.shardings_of(boxed, mesh, rules)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       nn.meta.unbox(boxed), shardings)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                   sharding=sharding.batch_sharding(mesh, v.ndim))
           for k, v in batch.items()}
  return state, batch, shardings


def unrolled_flops(c, tokenizer, targeter, batch_np, mesh, remat: bool) -> float:
  """FLOPs of the step with its layers unrolled, from the lowered HLO (no compile).

  XLA's cost analysis counts the body of a loop once, so a scanned step is counted on
  its unrolled twin; `remat=False` gives the model FLOPs MFU counts, `remat=True` the
  executed ones (recomputation included).
  """
  c = c.copy_and_resolve_references()
  c.model.update(remat=c.model.remat and remat, scan_layers=False)
  _, _, _, step, init = build(c, tokenizer, targeter)
  a_state, a_batch, _ = abstract_inputs(init, batch_np, mesh, c.axis_rules)
  with jax.set_mesh(mesh):
    return common.cost(jax.jit(step).lower(a_state, a_batch))["flops"]


def residual_memory(step, abstract_state, abstract_batch) -> dict[str, float]:
  """Bytes the step keeps between its forward and backward pass, from tracing alone.

  The step's `jax.value_and_grad` is traced once more as `jax.vjp`; the pullback's own
  residuals (activations saved for the backward pass, not the arguments) are summed.
  With the train state and one set of gradients this is what any backend must hold at
  the forward/backward boundary, before XLA's fusion and scheduling (which may remove
  elementwise residuals, and add the working memory of the largest op).
  """
  found, seen = [], set()
  real = jax.value_and_grad

  def spy(fun, *a, has_aux=False, **kw):
    inner = real(fun, *a, has_aux=has_aux, **kw)

    def call(*args):
      pullback = jax.vjp(fun, *args, has_aux=has_aux)[1]
      for r in getattr(pullback, "opaque_residuals", None) or jax.tree.leaves(pullback):
        if id(r) not in seen:
          seen.add(id(r))
          found.append(int(np.prod(r.shape)) * r.dtype.itemsize)
      return inner(*args)
    return call

  jax.value_and_grad = spy
  try:
    jax.eval_shape(step, abstract_state, abstract_batch)
  finally:
    jax.value_and_grad = real
  def nbytes(tree):   # PRNG keys: a few bytes, not counted
    return float(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)
                     if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)))
  out = dict(state=nbytes(abstract_state), gradients=nbytes(abstract_state.params),
             residuals=float(sum(found)), largest_residual=float(max(found, default=0)))
  out["total"] = out["state"] + out["gradients"] + out["residuals"]
  return out


def compare_itm(c, model, params, batch, steps: int) -> list[tuple[str, str]]:
  """Forward + backward of the ITM multimodal passes: one 3B pass vs three B passes."""
  ids, mask = batch["text_ids"], batch["text_mask"]
  b = ids.shape[0]
  image_seq = model.apply({"params": params}, batch["image"], method=SIMLA.embed_image)
  perm = jnp.roll(jnp.arange(b), 1)     # stand-in hard negatives
  pairs = [(ids, mask, image_seq), (ids, mask, image_seq[perm]), (ids[perm], mask[perm], image_seq)]

  def itm(p, ids, mask, seq, key):
    fused = model.apply({"params": p}, ids, mask, seq, method=SIMLA.fuse, deterministic=False,
                        rngs={"dropout": key})
    return jnp.sum(model.apply({"params": p}, fused, method=SIMLA.itm_logits) ** 2)

  def merged(p, key):
    ids3, mask3, seq3 = (jnp.concatenate(x) for x in zip(*pairs))
    return itm(p, ids3, mask3, seq3, key)

  def separate(p, key):
    return sum(itm(p, *pair, jax.random.fold_in(key, i)) for i, pair in enumerate(pairs))

  rows = []
  for name, f in (("one 3B pass", merged), ("three B passes", separate)):
    g = jax.jit(jax.grad(f))
    compiled = g.lower(params, jax.random.key(0)).compile()
    _, walls, _ = common.time_steps(lambda k: (k, compiled(params, k)), jax.random.key(0), steps)
    flops = common.cost(compiled)["flops"]
    rows.append((f"ITM fwd+bwd, {name}", f"{np.median(walls) * 1e3:.1f} ms, "
                                         f"{flops / 1e9:.2f} GFLOP"))
  return rows


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="default", choices=SIZES)
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--remat", action="store_true")
  p.add_argument("--remat_policy", default="nothing_saveable", choices=layers.REMAT_POLICIES)
  p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=None,
                 help="model.scan_layers (ViT blocks / BERT layers as one nn.scan each); "
                      "default: the size's config (on for base)")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--attention", default="einsum", choices=("einsum", "xla", "cudnn"))
  p.add_argument("--mesh", default="data=-1,fsdp=1,model=1")
  p.add_argument("--prng", default="threefry2x32",
                 choices=("threefry2x32", "threefry4x32", "philox2x32", "philox4x32", "rbg",
                          "unsafe_rbg"),
                 help="jax_default_prng_impl (dropout masks, negatives, MLM masking)")
  p.add_argument("--mim_target", default="random_projection", choices=("random_projection", "dvae"))
  p.add_argument("--no_donate", action="store_true", help="do not donate the state buffers")
  p.add_argument("--memory_only", action="store_true",
                 help="compile against abstract inputs; print the buffer assignment only")
  p.add_argument("--flops_only", action="store_true",
                 help="trace and lower only (no compile): the step's FLOPs from XLA's cost "
                      "analysis, at any size in seconds (a lax.cond counts both branches)")
  p.add_argument("--compare_itm", action="store_true")
  p.add_argument("--residuals", action="store_true",
                 help="trace only: state + gradients + activations saved for the backward pass")
  p.add_argument("--loss_weights", default="", help="ablation, e.g. itc=1,itm=1,mlm=0,mim=0,psl=0")
  p.add_argument("--dropout", type=float, default=None, help="ablation: BERT dropout rates")
  p.add_argument("--override", action="append", default=[],
                 help="config key=value (Python literal), e.g. model.vit.drop_path=0.1; "
                      "missing intermediate keys are created")
  p.add_argument("--model_gflop", type=float, default=0.0,
                 help="model FLOPs per step (GFLOP) measured before, e.g. on a CPU: skips the "
                      "no-remat trace, and counts attention that a cuDNN call hides from XLA")
  p.add_argument("--wait_load", type=float, default=0.0,
                 help="after compiling, wait until the 1-minute load is below this")
  p.add_argument("--wait_max_s", type=float, default=3600.0)
  p.add_argument("--cache", default="", help="persistent compile cache dir (compile s then "
                                             "measures a cache hit)")
  p.add_argument("--out", default="", help="append the result as a JSON line to this file")
  p.add_argument("--label", default="", help="free-text tag stored with the result")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  common.enable_compile_cache(args.cache)
  jax.config.update("jax_default_prng_impl", args.prng)
  load_before = common.load()

  c = make_config(args.size, args.batch, args.mim_target)
  c.model.update(remat=args.remat, dtype=args.dtype, attention_impl=args.attention)
  c.model.remat_policy = args.remat_policy
  if args.scan is not None:
    c.model.scan_layers = args.scan
  c.mesh.update({k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))})
  if args.loss_weights:
    c.loss_weights.update({k: float(v) for k, v in (kv.split("=") for kv in
                                                     args.loss_weights.split(","))})
  if args.dropout is not None:
    c.model.bert.update(dropout=args.dropout, attention_dropout=args.dropout)
  for item in args.override:
    override(c, item)
  tokenizer, targeter, model, step, init = build(c)

  mesh = sharding.make_mesh(c.mesh)
  batch_np = synthetic_batch(c, tokenizer)
  a_state, a_batch, shardings = abstract_inputs(init, batch_np, mesh, c.axis_rules)
  b = c.batch_size
  rows = [("size", args.size), ("batch", b), ("image px", c.data.image_size),
          ("text length", c.data.max_len), ("queue", c.queue_size),
          ("MIM target", c.data.mim.target), ("devices", f"{jax.device_count()} "
                                                         f"{common.machine()['device']}"),
          ("dtype", args.dtype),
          ("remat", args.remat_policy if args.remat else "off"),
          ("scan layers", c.model.scan_layers), ("attention", args.attention),
          ("prng", args.prng), ("donate", not args.no_donate),
          ("params (online)",
           f"{sum(np.prod(x.shape) for x in jax.tree.leaves(a_state.params)) / 1e6:.2f} M")]
  if args.loss_weights or args.dropout is not None:
    rows.append(("ABLATION", f"loss_weights={dict(c.loss_weights)} bert dropout="
                             f"{c.model.bert.dropout}"))
  record = dict(bench="simla", size=args.size, batch=b, dtype=args.dtype,
                remat=args.remat_policy if args.remat else "off", attention=args.attention,
                scan_layers=c.model.scan_layers,
                prng=args.prng, mim_target=c.data.mim.target, label=args.label,
                model_gflop_given=args.model_gflop or None,
                loss_weights=dict(c.loss_weights), bert_dropout=c.model.bert.dropout,
                overrides=args.override)

  if args.flops_only:
    if c.model.scan_layers:
      mflops = unrolled_flops(c, tokenizer, targeter, batch_np, mesh, remat=True)
    else:
      with jax.set_mesh(mesh):
        mflops = common.cost(jax.jit(step).lower(a_state, a_batch))["flops"]
    rows += [("GFLOP/step model (traced, no compile)", f"{mflops / 1e9:.2f}"),
             ("GFLOP per example", f"{mflops / 1e9 / b:.2f}")]
    common.print_rows(rows)
    common.append_result(args.out, {**record, "flops_only": True, "model_flops": mflops})
    return

  if args.residuals:
    with jax.set_mesh(mesh):
      res = residual_memory(step, a_state, a_batch)
    rows += [(f"traced: {k} GB", common.gb(v)) for k, v in res.items()]
    rows.append(("load before / after", f"{load_before} / {common.load()}"))
    common.print_rows(rows)
    common.append_result(args.out, {**record, "residuals_only": True,
                                    **{f"traced_{k}_bytes": v for k, v in res.items()}})
    return

  with jax.set_mesh(mesh):
    jitted = jax.jit(step, out_shardings=(shardings, None),
                     donate_argnums=() if args.no_donate else (0,))
    # Wall and process CPU seconds: on a shared machine CPU s changes much less with the
    # load (XLA's CPU compile is mostly one thread).
    t0, c0 = time.perf_counter(), time.process_time()
    lowered = jitted.lower(a_state, a_batch)
    t1, c1 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    lower_s, compile_s = t1 - t0, t2 - t1
    load_compiled = common.load()
    if c.model.scan_layers:
      flops = unrolled_flops(c, tokenizer, targeter, batch_np, mesh, remat=True)
    else:
      flops = common.cost(compiled)["flops"]
    if args.model_gflop:
      mflops = args.model_gflop * 1e9
    elif args.remat or c.model.scan_layers:
      mflops = unrolled_flops(c, tokenizer, targeter, batch_np, mesh, remat=False)
    else:
      mflops = common.cost(lowered)["flops"]
    mem = common.memory(compiled)
    rows += [("lower s (trace + StableHLO)", f"{lower_s:.1f}  (CPU {c1 - c0:.1f})"),
             ("compile s (XLA)", f"{compile_s:.1f}  (CPU {c2 - c1:.1f})"),
             ("lower + compile s", f"{lower_s + compile_s:.1f}  (load after: {load_compiled})"),
             ("GFLOP/step executed (XLA)", f"{flops / 1e9:.2f}"),
             ("GFLOP/step model (no remat)", f"{mflops / 1e9:.2f}")]
    rows += [(f"XLA buffers: {k} GB", common.gb(v)) for k, v in mem.items() if k != "code"]
    if jax.device_count() > 1:
      comm = common.collective_bytes(compiled)
      rows += [(f"{k} GB/device", common.gb(v)) for k, v in comm.items() if v]
      record.update({f"collective_{k}_bytes": v for k, v in comm.items()})
    # compile_s keeps its earlier meaning (lower + compile) for results.jsonl history.
    record.update(lower_s=lower_s, xla_compile_s=compile_s, compile_s=lower_s + compile_s,
                  lower_cpu_s=c1 - c0, xla_compile_cpu_s=c2 - c1,
                  load_compiled=load_compiled, flops=flops, model_flops=mflops,
                  **{f"xla_{k}_bytes": v for k, v in mem.items()})
    if args.memory_only:
      rows.append(("load before / after", f"{load_before} / {common.load()}"))
      common.print_rows(rows)
      common.append_result(args.out, {**record, "memory_only": True})
      return

    state, _ = sharding.sharded_init(init, mesh, c.axis_rules, jax.random.key(0))
    batch = sharding.global_batch(batch_np, mesh)
    if args.wait_load:
      waited = common.wait_for_load(args.wait_load, args.wait_max_s)
      rows.append(("waited for load", f"{waited:.0f} s (1-min load < {args.wait_load}?)"))
      load_before = common.load()
    carry, walls, cpus = common.time_steps(lambda s: compiled(s, batch), state, args.steps,
                                           args.warmup)
    state, metrics = carry, None
    # One more step to read the metrics (after timing: no transfer inside the timed loop).
    state, metrics = compiled(state, batch)
    loss = float(metrics["loss"])
    if args.compare_itm:
      rows += compare_itm(c, model, state.params, batch, max(3, args.steps // 2))

  step_s, cpu_s = float(np.median(walls)), float(np.median(cpus))
  dtype = jnp.dtype(args.dtype)
  # CPU: one device (however many fake ones) uses all cores, so its rate is the machine's.
  peak = peak_rate(dtype) * (1 if jax.default_backend() == "cpu" else jax.device_count())
  peak_mem, where = common.peak_memory_bytes()
  load_after = common.load()
  rows += [("step s (median)", f"{step_s:.4f}  (min {walls.min():.4f}, max {walls.max():.4f})"),
           ("CPU s per step (median)", f"{cpu_s:.3f}  ({cpu_s / step_s:.2f} cores busy)"),
           ("examples/s", f"{b / step_s:.2f}"),
           ("achieved TFLOP/s (model)", f"{mflops / step_s / 1e12:.4f}"),
           ("matmul peak TFLOP/s", f"{peak / 1e12:.4f} ({dtype.name}, measured now)"),
           ("MFU", f"{mflops / step_s / peak:.1%}"), ("HFU", f"{flops / step_s / peak:.1%}"),
           (f"peak memory GB ({where})", common.gb(peak_mem)),
           ("loss", f"{loss:.3f}"),
           ("load before / after", f"{load_before} / {load_after}")]
  common.print_rows(rows)
  record.update(step_s=step_s, step_min_s=float(walls.min()), cpu_s=cpu_s,
                examples_per_s=b / step_s, peak_flops=peak, mfu=mflops / step_s / peak,
                hfu=flops / step_s / peak, peak_memory_bytes=peak_mem, peak_memory_where=where,
                loss=loss, load_before=load_before, load_after=load_after, steps=args.steps)
  common.append_result(args.out, record)


if __name__ == "__main__":
  main()
