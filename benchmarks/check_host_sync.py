"""No host round-trips inside the training loop: what crosses from device to host, and when.

  python benchmarks/check_host_sync.py [--families simla,mvcom] [--steps 12] [--log_every 6]

Runs train_jax.loop.train_and_evaluate on each family's CPU-sized config for --steps
steps, logging every --log_every steps, checkpointing only at the end, evaluation off,
and counts every read of a device array's value on the host (`jax.device_get`,
`np.asarray`, `float`, `int`, `bool`, `.item()`, `.tolist()`: the methods of JAX's array
type, wrapped while the loop runs), attributed to the first calling frame outside JAX.
A `jax.device_get` counts once however many arrays it fetches. The Orbax checkpoint
save is excluded (it must read the arrays to write them). On a GPU
or TPU the run is also under `jax.transfer_guard_device_to_host("disallow")`, which
raises at any implicit transfer (on a CPU the guard does not fire: host and device
memory are the same). The expected result: one fetch from train_jax/loop.py per log
step, and nothing else.
"""

import argparse
import collections
import dataclasses
import inspect
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks import common  # noqa: E402
from train_jax import checkpoint as checkpoint_lib  # noqa: E402
from train_jax import loop  # noqa: E402


def family_config(name: str, steps: int, log_every: int):
  if name == "simla":
    from configs import simla
    from simla_jax import train
    c = simla.get_config("tiny")
  else:
    from configs import mvcom
    from face_jax import train
    c = mvcom.get_config(None)
    c.batch_size = 32
  c.total_steps = steps
  c.log_every_steps = log_every
  c.checkpoint_every_steps = steps
  c.eval_every_steps = 0
  c.progress_bar = False
  return c, train.make_task


_READS = ("__array__", "__float__", "__int__", "__bool__", "__index__", "__complex__", "item",
          "tolist", "_value")


class _HostReads:
  """Wraps the value-reading methods of JAX's array type; counts outermost calls by caller."""

  def __init__(self):
    from jax._src import array as array_lib  # pylint: disable=import-outside-toplevel
    self.cls, self.saved, self.calls, self.depth, self.paused = array_lib.ArrayImpl, {}, [], 0, 0

  def _caller(self) -> str:
    jax_dir = os.path.dirname(jax.__file__)
    for frame in inspect.stack()[2:]:
      if not frame.filename.startswith(jax_dir) and "numpy" not in frame.filename:
        return f"{os.path.relpath(frame.filename)}:{frame.lineno} ({frame.function})"
    return "?"

  def _wrap(self, fn, what: str = "array read"):
    def wrapper(*args, **kwargs):
      if self.depth == 0 and not self.paused:
        self.calls.append(f"{what} at {self._caller()}")
      self.depth += 1
      try:
        return fn(*args, **kwargs)
      finally:
        self.depth -= 1
    return wrapper

  def __enter__(self):
    self.device_get = jax.device_get
    jax.device_get = self._wrap(self.device_get, "jax.device_get")
    for name in _READS:
      attr = self.cls.__dict__.get(name)
      if attr is None:
        continue
      self.saved[name] = attr
      setattr(self.cls, name, property(self._wrap(attr.fget)) if isinstance(attr, property)
              else self._wrap(attr))
    return self

  def __exit__(self, *exc):
    jax.device_get = self.device_get
    for name, attr in self.saved.items():
      setattr(self.cls, name, attr)


def run(name: str, steps: int, log_every: int) -> list[tuple[str, str]]:
  config, make_task = family_config(name, steps, log_every)
  real_save = checkpoint_lib.Checkpointer.save
  on_cpu = jax.default_backend() == "cpu"

  def no_eval(config, mesh):
    return dataclasses.replace(make_task(config, mesh), evaluate=None, finish=None)

  error = None
  with _HostReads() as reads:
    def excluded_save(self, *args, **kwargs):
      reads.paused += 1
      try:
        with jax.transfer_guard_device_to_host("allow"):
          return real_save(self, *args, **kwargs)
      finally:
        reads.paused -= 1

    checkpoint_lib.Checkpointer.save = excluded_save
    try:
      with tempfile.TemporaryDirectory() as workdir, jax.transfer_guard_device_to_host("disallow"):
        loop.train_and_evaluate(config, workdir, no_eval)
    except Exception as e:  # pylint: disable=broad-except
      error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
      checkpoint_lib.Checkpointer.save = real_save
  by_caller = collections.Counter(reads.calls)
  rows = [(f"{name}: steps / log every", f"{steps} / {log_every}")]
  rows += [(f"{name}: host reads", f"{n} x {where}") for where, n in by_caller.items()]
  if not by_caller:
    rows.append((f"{name}: host reads", "none"))
  rows.append((f"{name}: transfer guard", error or ("not enforced on CPU" if on_cpu
                                                    else "no implicit transfer")))
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--families", default="simla,mvcom")
  p.add_argument("--steps", type=int, default=12)
  p.add_argument("--log_every", type=int, default=6)
  args = p.parse_args(argv)
  rows = []
  for name in args.families.split(","):
    rows += run(name.strip(), args.steps, args.log_every)
  rows.append(("load", common.load()))
  common.print_rows(rows, width=40)


if __name__ == "__main__":
  main()
