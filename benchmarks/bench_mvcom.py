"""MvCoM step cost: the plain CosFace step against the bilevel (meta) step, same backbone and batch.

  python benchmarks/bench_mvcom.py --size default [--batch 128] [--steps 10]
      [--dtype bfloat16] [--remat] [--scan on|off|off,on] [--compile_only] [--meta_every 10]
      [--out benchmarks/results.jsonl]

Sizes: default (configs/mvcom.py: synthetic 24 px faces, IResNet (1,1,1,1) x (16..128),
batch 128, meta batch 64, 600 identities), r18 / r50 / r100 (insightface IResNets at
112 px, embedding 512; batch 128, meta batch 64, --classes identities, default 10000).

Rows, each jitted as the loop jits it (state donated) on one synthetic batch:
  plain          face_jax.steps.Steps.train_step with method "plain" (CosFace, m0)
  mvcom          the same with method "mvcom", meta_every 1: virtual SGD step, meta loss
                 on the meta batch, meta-gradient into the margin model, real step
  mvcom shared   a prototype of the same step that runs the backbone forward at theta once
                 (`jax.vjp`) and uses its pullback for the virtual step, the meta-gradient
                 and the real step, since the margins only change the loss head. It reuses
                 Steps.train_loss with the forward replaced by the computed outputs, and
                 is checked against `mvcom` (max |difference| of the new parameters, margin
                 parameters and BatchNorm statistics after one step).
Every row is measured with each `--scan` setting (model.scan_layers off / on: each IResNet
stage's repeated blocks unrolled or one nn.scan; default on, `--scan off,on` compares). "lower s" is tracing + lowering to
StableHLO, "compile s" XLA's compilation of that (no persistent cache unless --cache):
together the wait before the first step. --compile_only stops there (no step timing).
Each is compared with the plain step (ratio); with --meta_every k the amortised ratio of
k steps (one meta step, k - 1 plain ones) is printed too. "GFLOP traced" is XLA's count
on the step as JAX emits it, "GFLOP run" after XLA's optimisations (common-subexpression
elimination merges identical computations, e.g. two forwards of the same parameters,
batch, BatchNorm statistics and dropout key).
"""

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.bench_matmul import peak_rate  # noqa: E402
from configs import mvcom as mvcom_config  # noqa: E402
from face_jax import meta as meta_lib  # noqa: E402
from face_jax import steps as face_steps  # noqa: E402
from train_jax import optimizers, sharding  # noqa: E402

SIZES = ("default", "r18", "r50", "r100")


def make_config(size: str, method: str, batch: int | None, meta_batch: int | None,
                classes: int, dtype: str, remat: bool, scan_layers: bool):
  c = mvcom_config.get_config(None)
  c.method = method
  c.mvcom.meta_every = 1
  if size != "default":
    c.model.update(arch=size, widths=(64, 128, 256, 512), embed_dim=512)
    c.data.image_size = 112
    c.data.num_train_ids = classes
    c.data.meta_batch_size = 64
  c.model.update(dtype=dtype, remat=remat, scan_layers=scan_layers)
  if batch:
    c.batch_size = batch
  if meta_batch:
    c.data.meta_batch_size = meta_batch
  return c


def synthetic_batch(c, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Training and meta batch with the keys of face_jax.synthetic_task.SyntheticBatches."""
  rng = np.random.default_rng(seed)
  s, ch = c.data.image_size, c.data.channels

  def part(n, prefix=""):
    out = {"image": rng.uniform(-1, 1, (n, s, s, ch)).astype(np.float32),
           "label": rng.integers(0, num_classes, n).astype(np.int32),
           "class_prior": rng.normal(size=n).astype(np.float32)}
    for name, size in c.mvcom.factors:
      out[name] = rng.integers(0, max(size, 2), n).astype(np.int32)
    return {prefix + k: v for k, v in out.items()}
  return {**part(c.batch_size), **part(c.data.meta_batch_size, "meta_")}


def shared_forward_step(steps: face_steps.Steps):
  """MvCoM step (meta_every 1) with one backbone forward at theta for all three uses."""
  cfg = steps.config

  def train_step(state, batch):
    rng, step_rng = jax.random.split(state.rng)
    stats = state.extras["batch_stats"]

    def forward(params):
      cos, attr, new_stats = steps.forward(params, stats, batch["image"], step_rng)
      return (cos, attr), new_stats
    outs, pullback, new_stats = jax.vjp(forward, state.params, has_aux=True)

    def head_loss(outs, phi):
      """Steps.train_loss after its forward: margins, margin logits, CE, attribute loss."""
      head = copy.copy(steps)
      head.forward = lambda *_: (*outs, new_stats)
      return head.train_loss(None, stats, batch, step_rng, phi)

    def theta_grad(phi):
      return pullback(jax.grad(lambda o: head_loss(o, phi)[0])(outs))[0]

    def meta_objective(phi):
      lr = steps.schedule(state.step) * cfg.mvcom.virtual_lr_scale
      virtual = meta_lib.sgd_lookahead(state.params, theta_grad(phi), lr)
      return steps.meta_loss(virtual, stats, batch, step_rng)

    phi = state.extras["margin"]
    meta_value, meta_grad = jax.value_and_grad(meta_objective)(phi)
    updates, opt = steps.meta_tx.update(meta_grad, state.extras["margin_opt"], phi)
    phi = optax.apply_updates(phi, updates)
    (loss, aux), outs_grad = jax.value_and_grad(head_loss, has_aux=True)(outs, phi)
    grads = pullback(outs_grad)[0]
    extras = dict(state.extras, margin=phi, margin_opt=opt, batch_stats=new_stats)
    new_state = state.apply_gradients(steps.tx, grads, rng=rng, extras=extras)
    return new_state, dict(loss=loss, meta_loss=meta_value, ce=jnp.mean(aux["ce"]))

  return train_step


def max_difference(a, b) -> float:
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="default", choices=SIZES)
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--meta_batch", type=int, default=None)
  p.add_argument("--classes", type=int, default=10000, help="identities (r18..r100 sizes)")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--remat", action="store_true")
  p.add_argument("--meta_every", type=int, default=10,
                 help="for the amortised ratio only (configs/mvcom.py:paper uses 10)")
  p.add_argument("--rows", default="plain,mvcom,mvcom shared")
  p.add_argument("--scan", default="on",
                 help="model.scan_layers settings to measure, comma-separated: off, on, "
                      "or off,on to compare them")
  p.add_argument("--compile_only", action="store_true",
                 help="lower and compile each row, no step timing and no equality check")
  p.add_argument("--no_check", action="store_true", help="skip the prototype's equality check")
  p.add_argument("--cache", default="")
  p.add_argument("--out", default="")
  p.add_argument("--label", default="")
  return p.parse_args(argv)


def build(args, scan_layers: bool):
  """{method: (config, Steps)} for plain and mvcom with this scan setting."""
  variants = {}
  for method in ("plain", "mvcom"):
    c = make_config(args.size, method, args.batch, args.meta_batch, args.classes, args.dtype,
                    args.remat, scan_layers)
    tx, schedule = optimizers.make_optimizer(c.optimizer, c.total_steps)
    steps = face_steps.Steps(c, face_steps.build_model(c, int(c.data.num_train_ids)), tx,
                             schedule)
    variants[method] = (c, steps)
  return variants


def measure_row(steps, fn, c, mesh, batch, args):
  """Lower, compile and (unless --compile_only) time one step function -> result dict."""
  image_shape = (c.data.image_size, c.data.image_size, c.data.channels)
  state, shardings = sharding.sharded_init(lambda r: steps.init(r, image_shape), mesh,
                                           c.axis_rules, jax.random.key(0))
  # Past the warm-up, so the virtual step size (the current lr) is not 0.
  state = state.replace(step=jnp.asarray(c.optimizer.schedule.warmup_steps + 10, jnp.int32))
  jitted = jax.jit(fn, out_shardings=(shardings, None), donate_argnums=(0,))
  t0, c0 = time.perf_counter(), time.process_time()
  lowered = jitted.lower(state, batch)
  t1, c1 = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  t2, c2 = time.perf_counter(), time.process_time()
  mem = common.memory(compiled)
  # CPU seconds (all threads of this process) beside the wall seconds: on a shared machine
  # they change much less with the load.
  r = dict(lower_s=t1 - t0, compile_s=t2 - t1, lower_cpu_s=c1 - c0, compile_cpu_s=c2 - c1,
           flops=common.cost(compiled)["flops"],
           traced_flops=common.cost(lowered)["flops"], xla_peak_bytes=mem.get("peak", 0))
  if not args.compile_only:
    _, walls, cpus = common.time_steps(lambda s: compiled(s, batch), state, args.steps,
                                       args.warmup)
    r.update(step_s=float(np.median(walls)), cpu_s=float(np.median(cpus)))
  return r


def main(argv=None):
  args = parse_args(argv)
  common.enable_compile_cache(args.cache)
  load_before = common.load()
  wanted = [r.strip() for r in args.rows.split(",")]
  scans = [{"off": False, "on": True}[v.strip()] for v in args.scan.split(",")]
  header = ["scan", "step", "lower s", "compile s", "compile CPU s", "step s", "CPU s", "examples/s",
            "GFLOP traced", "GFLOP run", "MFU", "XLA peak GB", "x plain"]
  table, results, checks = [], {}, {}
  c = None
  for scan in scans:
    variants = build(args, scan)
    c, mvcom_steps = variants["mvcom"]
    num_classes = int(c.data.num_train_ids)
    mesh = sharding.make_mesh(c.mesh)
    batch_np = synthetic_batch(c, num_classes)
    fns = {"plain": (variants["plain"][1], variants["plain"][1].train_step),
           "mvcom": (mvcom_steps, mvcom_steps.train_step),
           "mvcom shared": (mvcom_steps, shared_forward_step(mvcom_steps))}
    with jax.set_mesh(mesh):
      batch = sharding.global_batch(batch_np, mesh)
      for name in wanted:
        steps, fn = fns[name]
        results[scan, name] = measure_row(steps, fn, c, mesh, batch, args)
        print(f"scan {scan} {name}: " + ", ".join(
            f"{k} {v:.2f}" for k, v in results[scan, name].items() if k.endswith("_s")), flush=True)
      if not (args.no_check or args.compile_only) and {"mvcom", "mvcom shared"} <= set(wanted):
        image_shape = (c.data.image_size, c.data.image_size, c.data.channels)
        state, _ = sharding.sharded_init(lambda r: mvcom_steps.init(r, image_shape), mesh,
                                         c.axis_rules, jax.random.key(0))
        state = state.replace(step=jnp.asarray(c.optimizer.schedule.warmup_steps + 10, jnp.int32))
        checks[scan] = [jax.jit(fns[n][1])(state, batch)[0] for n in ("mvcom", "mvcom shared")]
    peak = peak_rate(jnp.dtype(args.dtype)) * (1 if jax.default_backend() == "cpu"
                                                 else jax.device_count())
  for (scan, name), r in results.items():
    base = results.get((scan, "plain"), {}).get("step_s")
    step_s = r.get("step_s")
    timed = step_s is not None
    table.append(["on" if scan else "off", name, f"{r['lower_s']:.1f}", f"{r['compile_s']:.1f}",
                  f"{r['compile_cpu_s']:.1f}", f"{step_s:.4f}" if timed else "-", f"{r['cpu_s']:.3f}" if timed else "-",
                  f"{c.batch_size / step_s:.1f}" if timed else "-",
                  f"{r['traced_flops'] / 1e9:.2f}", f"{r['flops'] / 1e9:.2f}",
                  f"{r['flops'] / step_s / peak:.1%}" if timed else "-",
                  common.gb(r["xla_peak_bytes"]),
                  f"{step_s / base:.2f}" if timed and base else "-"])
  print(f"MvCoM step cost: size {args.size}, batch {c.batch_size} "
        f"(+ meta {c.data.meta_batch_size}), "
        f"{num_classes} identities, {args.dtype}, remat {args.remat}, "
        f"{jax.device_count()} {common.machine()['device']}; matmul peak {peak / 1e12:.4f} TFLOP/s")
  common.print_table(header, table)
  k = args.meta_every
  for scan in scans:
    base = results.get((scan, "plain"), {}).get("step_s")
    for name in ("mvcom", "mvcom shared"):
      r = results.get((scan, name), {})
      if base and "step_s" in r:
        amortised = (r["step_s"] + (k - 1) * base) / (k * base)
        flop_ratio = r["flops"] / results[scan, "plain"]["flops"]
        print(f"scan {'on' if scan else 'off'}, {name}: {r['step_s'] / base:.2f}x the plain step "
              f"({flop_ratio:.2f}x its FLOPs); meta_every {k}: {amortised:.2f}x amortised")
  for scan, (a, b) in checks.items():
    print(f"scan {'on' if scan else 'off'}: mvcom shared vs mvcom after one step, max |difference|: "
          f"params {max_difference(a.params, b.params):.2e}, "
          f"margin params {max_difference(a.extras['margin'], b.extras['margin']):.2e}, "
          f"batch stats {max_difference(a.extras['batch_stats'], b.extras['batch_stats']):.2e}")
  load_after = common.load()
  print(f"load before / after: {load_before} / {load_after}")
  for (scan, name), r in results.items():
    base = results.get((scan, "plain"), {}).get("step_s")
    common.append_result(args.out, dict(
        bench="mvcom", row=name, size=args.size, batch=c.batch_size,
        meta_batch=c.data.meta_batch_size, classes=num_classes, dtype=args.dtype,
        remat=args.remat, scan_layers=scan, compile_only=args.compile_only, label=args.label,
        peak_flops=peak, ratio=r["step_s"] / base if base and "step_s" in r else None,
        load_before=load_before, load_after=load_after, **r))


if __name__ == "__main__":
  main()
