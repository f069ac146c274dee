"""A tiny face config and task for the tests (a few-second compile)."""

import optax

from configs import mvcom as mvcom_config
from face_jax import train


def tiny_config(arg=""):
  c = mvcom_config.get_config(arg)
  c.batch_size = 16
  c.total_steps = 6
  c.log_every_steps = 2
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 6
  c.progress_bar = False
  c.model.update(layers=(1,), widths=(4,), embed_dim=8)   # stem + one stride-2 block + head
  c.data.update(image_size=8, frequencies=3, num_train_ids=40, images_per_id=(3, 5),
                group_fractions=(0.6, 0.25, 0.15), meta_ids_per_group=3, meta_images_per_id=2,
                test_ids_per_group=4, test_images_per_id=5, pairs_per_cell=20,
                meta_batch_size=8, prefetch_batches=0)
  c.loss.s = 16.0
  c.optimizer.lr = 0.1
  c.optimizer.schedule.warmup_steps = 0
  c.mvcom.meta_lr = 0.05
  c.eval.update(batch_size=32, n_folds=2)
  return c


def make_task(config):
  tx = optax.sgd(optax.constant_schedule(config.optimizer.lr), momentum=0.9)
  return train.make_task_with(config, tx, optax.constant_schedule(config.optimizer.lr))
