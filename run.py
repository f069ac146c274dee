"""Train a model family: python run.py --config=configs/simla.py [--workdir=DIR].

`--config=configs/x.py:arg` selects a variant; `--config.key=value` overrides a key
(an unknown key is an error naming it). Rerunning the same command resumes from
the latest checkpoint in the workdir. Compiled programs are kept in a persistent cache
(--compile_cache), so a resumed run or a rerun of a config skips most of its compilation.
"""

import time

_STARTED = time.perf_counter()   # start-up is measured from here (compile/first_step_s)

import importlib  # noqa: E402
import os  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

# Family name -> module with `make_task(config, mesh) -> train_jax.task.Task`.
FAMILIES = {
    "simla": "simla_jax.train",
    "mvcom": "face_jax.train",
    "simla_retrieval": "simla_jax.tasks.retrieval",
    "simla_ve": "simla_jax.tasks.ve",
    "simla_vqa": "simla_jax.tasks.vqa",
    "simla_nlvr_pretrain": "simla_jax.tasks.nlvr",
    "simla_nlvr": "simla_jax.tasks.nlvr",
    "simla_grounding": "simla_jax.tasks.grounding",
}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py), optionally ':arg' for a variant.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics.jsonl, TensorBoard logs and plots. "
    "Default: runs/<config name>[_<arg>]. An existing workdir is resumed.")
_COMPILE_CACHE = flags.DEFINE_string(
    "compile_cache", os.environ.get("JAX_COMPILATION_CACHE_DIR") or
    os.path.join(os.path.expanduser("~"), ".cache", "simla_face_jax_xla"),
    "Persistent XLA compilation cache directory ('' turns it off). Default: "
    "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/simla_face_jax_xla.")
_COMPILE_CACHE_MIN_S = flags.DEFINE_float(
    "compile_cache_min_s", 0.5, "Cache programs whose compilation took at least this many "
    "seconds: the train step (tens of seconds on a CPU) and the evaluation functions.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() (auto-detected on Cloud TPU, "
    "SLURM, or when JAX_COORDINATOR_ADDRESS or --coordinator_address is set).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator, for a launch that "
    "JAX does not detect (e.g. several processes on one machine: 127.0.0.1:PORT).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address: 0..n-1.")


def default_workdir(config_arg: str) -> str:
  path, _, arg = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("runs", f"{name}_{arg}" if arg else name)


def family_module(name: str):
  if name not in FAMILIES:
    raise app.UsageError(f"config.family={name!r} is not a known family; known: "
                         f"{', '.join(sorted(FAMILIES))}")
  return importlib.import_module(FAMILIES[name])


def _multihost_env() -> bool:
  """A launcher JAX's `initialize()` reads addresses and ranks from (see its cluster docs)."""
  env = os.environ
  if any(v in env for v in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
                            "MEGASCALE_COORDINATOR_ADDRESS")):
    return True
  # srun with several tasks (a plain `python` inside sbatch has no step node list), mpirun.
  if "SLURM_STEP_NODELIST" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  return int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def enable_compile_cache(path: str, min_compile_s: float) -> None:
  """JAX's persistent compilation cache in `path` ('' leaves it off), any entry size."""
  import jax
  if not path:   # also over $JAX_COMPILATION_CACHE_DIR, which jax reads at import
    jax.config.update("jax_compilation_cache_dir", None)
    return
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.expanduser(path)))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  import jax  # after flags: XLA_FLAGS from the environment take effect first
  enable_compile_cache(_COMPILE_CACHE.value, _COMPILE_CACHE_MIN_S.value)
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _MULTIHOST.value or _multihost_env():
    jax.distributed.initialize()  # addresses and ranks from the cluster's environment
  from train_jax import loop

  config = _CONFIG.value
  module = family_module(config.family)
  workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"])
                                              + _config_arg())
  logging.info("config:\n%s", config)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  if config.get("eval_only", False):   # a family's checkpoint evaluation, no training
    module.evaluate_checkpoint(config, workdir)
    return
  try:
    loop.train_and_evaluate(config, workdir, module.make_task, started=_STARTED)
  except loop.RunInterrupted as e:  # the loop printed what it saved
    raise SystemExit(e.exit_code) from None


def _config_arg() -> str:
  raw = flags.FLAGS["config"].serialize()  # "--config=path[:arg]"
  _, _, value = raw.partition("=")
  _, sep, arg = value.partition(":")
  return sep + arg


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
