"""Test setup: 8 fake CPU devices and the persistent compile cache, before JAX starts."""

import os
import pathlib
import sys

# setdefault: a multi-process launcher (or a developer) may override these.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = pathlib.Path(os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                     pathlib.Path.home() / ".cache" / "simla_face_jax_xla"))
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402  (after the environment is set)

jax.config.update("jax_compilation_cache_dir", str(_CACHE))


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end runs (seconds to minutes); deselect with -m 'not slow'")
