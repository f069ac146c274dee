"""Checkpoint files read safely: configs saved beside the weights load as inert data,
hostile pickles are refused naming the global, nothing from the file runs."""

import argparse
import os
import sys
import types
import typing

import numpy as np
import pytest
import torch

from simla_jax import checkpoint_io
from simla_jax import convert

CALLS = []   # every method of the fake config classes appends here: loading must not


def _fake_omegaconf(monkeypatch):
  """Modules "omegaconf.dictconfig" / "omegaconf.nodes" / "omegaconf.base" whose classes
  pickle like OmegaConf's (protocol-2 NEWOBJ + BUILD of their __dict__)."""

  class Metadata:
    def __init__(self, key=None):
      self.ref_type, self.object_type, self.optional, self.key = typing.Any, dict, True, key

    def __setstate__(self, state):
      CALLS.append("Metadata.__setstate__")
      self.__dict__.update(state)

  class AnyNode:
    def __init__(self, value, key):
      self._val, self._metadata, self._parent = value, Metadata(key), None

    def __setstate__(self, state):
      CALLS.append("AnyNode.__setstate__")
      self.__dict__.update(state)

  class DictConfig:
    def __init__(self, content):
      self._metadata, self._parent = Metadata(), None
      self._content = {k: DictConfig(v) if isinstance(v, dict) else AnyNode(v, k)
                       for k, v in content.items()}

    def __new__(cls, *args, **kwargs):
      CALLS.append("DictConfig.__new__")
      return object.__new__(cls)

    def __getstate__(self):
      return dict(self.__dict__)

    def __setstate__(self, state):
      CALLS.append("DictConfig.__setstate__")
      self.__dict__.update(state)

  for module, classes in (("omegaconf.base", [Metadata]), ("omegaconf.nodes", [AnyNode]),
                          ("omegaconf.dictconfig", [DictConfig])):
    mod = types.ModuleType(module)
    for cls in classes:
      cls.__module__, cls.__qualname__ = module, cls.__name__
      setattr(mod, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, module, mod)
  monkeypatch.setitem(sys.modules, "omegaconf", types.ModuleType("omegaconf"))
  return DictConfig


def test_config_objects_load_as_inert_data(tmp_path, monkeypatch):
  dict_config = _fake_omegaconf(monkeypatch)
  config = dict_config({"image_res": 256, "optimizer": {"lr": 1e-4, "opt": "adamW"}})
  path = tmp_path / "checkpoint_00.pth"
  weight = torch.arange(6, dtype=torch.float32).reshape(2, 3)
  torch.save({"model": {"w": weight}, "config": config, "epoch": 3,
              "args": argparse.Namespace(lr=0.1, output_dir="out")}, path)
  assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path))   # not weights-only
  with pytest.raises(Exception, match="omegaconf"):
    torch.load(path, weights_only=True)
  CALLS.clear()
  loaded = checkpoint_io.load_file(path)
  assert CALLS == [], f"code of the file's classes ran: {CALLS}"   # even with them importable
  assert isinstance(loaded["config"], checkpoint_io.Inert)
  assert checkpoint_io.to_plain(loaded["config"]) == {
      "image_res": 256, "optimizer": {"lr": 1e-4, "opt": "adamW"}}
  assert checkpoint_io.to_plain(loaded["args"]) == {"lr": 0.1, "output_dir": "out"}
  torch.testing.assert_close(loaded["model"]["w"], weight)
  np.testing.assert_array_equal(convert.read_state_dict(str(path))["w"], weight.numpy())


def test_legacy_format_with_a_config_loads(tmp_path):
  path = tmp_path / "legacy.pth"
  torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(seed=42)}, path,
             _use_new_zipfile_serialization=False)
  loaded = checkpoint_io.load_file(path)
  assert checkpoint_io.to_plain(loaded["args"]) == {"seed": 42}


class _Hostile:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_hostile_pickle_is_refused_naming_the_global(tmp_path, zip_format):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  torch.save({"model": {"w": torch.ones(2)}, "config": _Hostile(marker)}, path,
             _use_new_zipfile_serialization=zip_format)
  with pytest.raises(checkpoint_io.UnsafeCheckpointError, match=r"posix\.system") as info:
    checkpoint_io.load_file(path)
  assert "Nothing from the file was executed" in str(info.value)
  with pytest.raises(convert.CheckpointError, match=r"posix\.system"):
    convert.read_state_dict(str(path))
  assert not marker.exists()


def test_missing_file_is_named(tmp_path):
  with pytest.raises(convert.CheckpointError, match="nope.pth does not exist"):
    convert.read_state_dict(str(tmp_path / "nope.pth"))
