"""A trained run's workdir -> the embedder its checkpoint holds; IJB from a workdir."""

import os

import numpy as np
import pytest
from PIL import Image

from face_jax import ijb
from face_jax import restore
from face_jax.data import pipeline
from face_tiny import make_task, tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 2-step tiny CosFace run through the generic loop: (workdir, final state, task)."""
  from train_jax import loop
  config = tiny_config("cosface")
  config.total_steps = config.checkpoint_every_steps = 2
  workdir = str(tmp_path_factory.mktemp("run"))
  with open(os.path.join(workdir, "config.json"), "w") as f:   # as run.py writes it
    f.write(config.to_json_best_effort(indent=2))
  tasks = []

  def factory(c, mesh):
    del mesh
    tasks.append(make_task(c))
    return tasks[-1]

  state = loop.train_and_evaluate(config, workdir, factory)
  return workdir, state, tasks[-1]


def test_embedder_equals_the_trained_state(run):
  workdir, state, task = run
  embed, size = restore.load_embedder(workdir)
  assert size == 8
  images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), np.uint8)
  steps = task.train_step.__self__
  want = np.asarray(steps.embed_fn(state.params, state.extras["batch_stats"], pipeline.normalize(images)))
  np.testing.assert_allclose(embed(images), want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="no readable config.json"):
    restore.load_embedder(os.path.dirname(workdir))


def test_ijb_cli_embeds_loose_crops_with_a_workdir(run, tmp_path):
  workdir, _, _ = run
  meta, _, _ = ijb.write_synthetic(str(tmp_path / "meta"), target="ijbc", subjects=3, seed=4)
  os.makedirs(tmp_path / "crops")
  rng = np.random.default_rng(1)
  for name in meta.names:
    Image.fromarray(rng.integers(0, 256, (150, 150, 3), np.uint8)).save(tmp_path / "crops" / name)
  summary = ijb.main(["--meta_dir", str(tmp_path / "meta"), "--workdir", workdir,
                      "--image_dir", str(tmp_path / "crops"), "--batch_size", "16"])
  embed, size = restore.load_embedder(workdir)
  feats, flips = ijb.embed_protocol(embed, str(tmp_path / "crops"), meta, 16, size)
  want = ijb.evaluate(meta, feats, flips)
  assert summary["tar@far=0.1"] == want["tar@far=0.1"]
  assert summary["genuine_pairs"] == want["genuine_pairs"] > 0
  with pytest.raises(ValueError, match="--features or --workdir"):
    ijb.main(["--meta_dir", str(tmp_path / "meta")])
