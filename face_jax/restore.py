"""A trained face model from a run's workdir: config.json + newest checkpoint -> an embedder.

For evaluations outside the training loop (`python -m face_jax.ijb --workdir ...`): the
network is rebuilt from the run's own config (so the parameter layout is the one its
checkpoints hold), and only params and BatchNorm statistics are read, onto this host's
first device, whatever mesh wrote them.
"""

import json
import os
from typing import Callable

import jax
import ml_collections
import numpy as np

from face_jax import steps as steps_lib
from face_jax.data import pipeline
from face_jax.models.face import FaceModel


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      config = ml_collections.ConfigDict(json.load(f))
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{workdir}: no readable config.json of a face run ({e})") from None
  if config.get("family") != "mvcom":
    raise ValueError(f"{path}: family {config.get('family')!r}, expected a face ('mvcom') run")
  return config


def restore_variables(workdir: str) -> tuple[dict, dict, int]:
  """(params, batch_stats, step) of the newest checkpoint under <workdir>/checkpoints."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise ValueError(f"{workdir}: no checkpoints folder")
  manager = ocp.CheckpointManager(directory)
  step = manager.latest_step()
  manager.close()
  if step is None:
    raise ValueError(f"{directory}: no checkpoint")
  path = os.path.join(directory, str(step), "state")
  tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  wanted = {"params": tree["params"], "extras": {"batch_stats": tree["extras"]["batch_stats"]}}
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), wanted)
  restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=abstract, partial_restore=True,
      restore_args=jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract)))
  return restored["params"], restored["extras"]["batch_stats"], int(step)


def load_embedder(workdir: str) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
  """(embed: uint8 (b, s, s, c) -> float32 (b, d) unnormalised embeddings, s = the run's
  image size)."""
  config = read_run_config(workdir)
  params, batch_stats, _ = restore_variables(workdir)
  num_classes = int(params["classifier"]["centres"].shape[0])
  model = steps_lib.build_model(config, num_classes)
  fn = jax.jit(lambda x: model.apply({"params": params, "batch_stats": batch_stats}, x,
                                     method=FaceModel.embed))
  return (lambda images: np.asarray(fn(pipeline.normalize(images)), np.float32)), \
      int(config.data.image_size)
