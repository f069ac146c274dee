"""Reading PyTorch checkpoint files safely: tensors, plus configs saved beside them as inert data.

The official training scripts save `{"model": state_dict, "optimizer", "config", ...}`:
`Pretrain.py` stores a Hydra / OmegaConf `DictConfig`, others an argparse `Namespace` or a
dict. `torch.load(weights_only=True)` refuses the first two. Here every global the file
names is checked before anything is unpickled:

  * tensors, storages and containers: torch's own weights-only allowlist;
  * configuration classes (`INERT_GLOBALS`): replaced by `Inert` records of our own that
    only store the constructor arguments and the pickled state; no code of the file's
    classes is imported or run, and `to_plain` turns them into dicts / lists / scalars;
  * anything else (os.system, builtins.eval, an unknown class): the file is refused with
    an error naming every such global.

The unpickler is torch's weights-only one, with the `Inert` stand-ins registered under
the globals' names for the duration of the load.
"""

import fnmatch
import os
import pickle
import re
import zipfile
from typing import Any

import numpy as np

# Globals read as inert records (fnmatch patterns over "module.qualname"). Configuration
# containers only: OmegaConf nodes and their metadata, argparse.Namespace, paths, and the
# type objects OmegaConf stores as metadata (typing.Any, dict, list, ...).
INERT_GLOBALS = (
    "omegaconf.*",
    "argparse.Namespace",
    "typing.Any",
    "collections.defaultdict",
    "pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePosixPath",
    "builtins.dict", "builtins.list", "builtins.tuple", "builtins.set", "builtins.int",
    "builtins.float", "builtins.str", "builtins.bool", "builtins.NoneType",
)

_MAX_RETRIES = 64   # legacy (non-zip) files: one retry per newly found inert global


class UnsafeCheckpointError(ValueError):
  """The file names a global that is neither a tensor type nor inert configuration data."""


class Inert:
  """Stand-in for a class or function named in a checkpoint file: records, never runs.

  Calling it (pickle REDUCE / NEWOBJ) makes an instance that keeps the arguments;
  BUILD stores the state. `global_name` is the dotted name the file used.
  """
  global_name = "?"

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    obj.args, obj.kwargs, obj.state = args, kwargs, None
    return obj

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    self.state = state

  def __repr__(self):
    return f"Inert({self.global_name}, args={self.args!r}, state={self.state!r})"


_STAND_INS: dict[str, type] = {}


def stand_in(global_name: str) -> type:
  """The `Inert` subclass standing for `global_name` (one per name, so identity holds)."""
  if global_name not in _STAND_INS:
    module, _, name = global_name.rpartition(".")
    _STAND_INS[global_name] = type(name, (Inert,), {"global_name": global_name,
                                                    "__module__": "simla_jax.checkpoint_io"})
  return _STAND_INS[global_name]


def is_inert(global_name: str) -> bool:
  return any(fnmatch.fnmatchcase(global_name, p) for p in INERT_GLOBALS)


def _refuse(path: str, names: list[str]) -> UnsafeCheckpointError:
  return UnsafeCheckpointError(
      f"{path}: refusing to unpickle: it references {', '.join(sorted(set(names)))}, which "
      "is neither a tensor type (torch's weights-only list) nor configuration data "
      "(simla_jax.checkpoint_io.INERT_GLOBALS). Nothing from the file was executed.")


def _unsupported_global(error: Exception) -> str | None:
  """The global named by torch's weights-only refusal message, with its module."""
  m = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", str(error))
  if not m:
    return None
  name = m.group(1)
  return name if "." in name else f"builtins.{name}"   # torch drops the builtins prefix


def load_torch_file(path: str) -> Any:
  """`torch.load` of a `.pth` / `.bin` with tensors, containers and inert configs only.

  Raises UnsafeCheckpointError naming every global that is not allowed.
  """
  import torch  # pylint: disable=import-outside-toplevel
  extra: list[str] = []
  if zipfile.is_zipfile(path):
    # The zip format's pickle can be scanned without unpickling anything.
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    refused = [g for g in unsafe if not is_inert(g)]
    if refused:
      raise _refuse(path, refused)
    extra = list(unsafe)
  for _ in range(_MAX_RETRIES):
    with torch.serialization.safe_globals([(stand_in(g), g) for g in extra]):
      try:
        return torch.load(path, map_location="cpu", weights_only=True)
      except pickle.UnpicklingError as e:
        name = _unsupported_global(e)
        if name is None or name in extra:
          raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True): "
                           f"{str(e).splitlines()[0]}") from e
        if not is_inert(name):
          raise _refuse(path, [name]) from None
        extra.append(name)
  raise ValueError(f"{path}: more than {_MAX_RETRIES} distinct configuration globals")


def load_file(path: str | os.PathLike) -> Any:
  """A checkpoint file's content: `.safetensors` -> {name: numpy array}; otherwise
  `load_torch_file`. A missing file is a FileNotFoundError naming it."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint file {path} does not exist")
  if path.endswith(".safetensors"):
    import safetensors.numpy  # pylint: disable=import-outside-toplevel
    return safetensors.numpy.load_file(path)
  return load_torch_file(path)


def to_plain(obj: Any) -> Any:
  """Inert records and containers -> plain Python (dict, list, str, numbers, None).

  OmegaConf DictConfig / ListConfig become dicts / lists of their values (interpolation
  strings stay strings), argparse.Namespace a dict, a path its string, a type reference
  its dotted name; other records {"__class__": name, "args": ..., "state": ...}.
  """
  if isinstance(obj, type) and issubclass(obj, Inert):
    return obj.global_name
  if isinstance(obj, Inert):
    name, state = obj.global_name, obj.state
    if name == "omegaconf.dictconfig.DictConfig" and isinstance(state, dict):
      content = state.get("_content")
      return ({str(k): to_plain(v) for k, v in content.items()} if isinstance(content, dict)
              else to_plain(content))
    if name == "omegaconf.listconfig.ListConfig" and isinstance(state, dict):
      content = state.get("_content")
      return [to_plain(v) for v in content] if isinstance(content, list) else to_plain(content)
    if name.startswith("omegaconf.nodes.") and isinstance(state, dict) and "_val" in state:
      return to_plain(state["_val"])
    if name == "argparse.Namespace":
      return to_plain(state if state is not None else obj.kwargs)
    if name.startswith("pathlib."):
      return os.path.join(*map(str, obj.args)) if obj.args else ""
    if name == "collections.defaultdict":
      return to_plain(state or {})
    return {"__class__": name, "args": to_plain(list(obj.args)), "state": to_plain(state)}
  if isinstance(obj, dict):
    return {k: to_plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(to_plain(v) for v in obj)
  if type(obj).__module__.startswith("torch") or isinstance(obj, np.ndarray):
    return obj
  return obj
