"""Fixtures the SIMLA fine-tuning task tests share."""

import jax
import pytest

import tiny_checkpoint


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """(workdir, its pretraining config, its train state on the host) of a tiny pretraining
  workdir, written once per test module."""
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  cfg, _, state = tiny_checkpoint.write_tiny_pretraining(workdir)
  return workdir, cfg, jax.device_get(state)
