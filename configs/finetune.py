"""What the SIMLA fine-tuning configs (VE, VQA, NLVR2, retrieval, grounding) share: the
start, the official recipes' input and epoch schedule, and the CPU-sized shapes-world run.
Each config calls these and writes its own numbers next to them."""

import ml_collections

from configs import common
from configs import simla_model
from simla_jax.data import default_data_config


def base(family: str, checkpoint: str) -> ml_collections.ConfigDict:
  """`common.base()` for a fine-tuning `family` from `init.checkpoint`, with the default
  data, the base network and the official AdamW (weight decay 0.02, none on biases and
  LayerNorm scales) on a cosine schedule."""
  c = common.base()
  c.family = family
  c.init = ml_collections.ConfigDict(dict(checkpoint=checkpoint))
  c.data = default_data_config()
  # The network when init.checkpoint is an official .pth (a workdir's config.json wins).
  c.model = simla_model.model_config("base")
  # BERT dropout while fine-tuning (official bert_config.json: 0.1 and 0.1), also when the
  # pretraining run used another (the CPU pretraining default uses none).
  c.bert_dropout = ml_collections.ConfigDict(dict(dropout=0.1, attention_dropout=0.1))
  c.optimizer.name = "adamw"
  c.optimizer.weight_decay = 0.02
  c.optimizer.no_decay = (r".*bias$", r".*scale$")
  c.optimizer.schedule.name = "cosine"
  return c


def eval_splits(batch_size: int, **more) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      splits=("val",),                # read during training (model selection)
      final_splits=("test",),         # scored once, after the last step
      batch_size=batch_size, **more))


def official_input(c: ml_collections.ConfigDict, name: str, image_size: int = 384) -> None:
  """The official recipes' data `name` at `image_size` px (pretraining positions are
  interpolated), the bert-base-uncased vocabulary and checkpoint to set, and their
  RandomResizedCrop (area 0.5-1) with a flip that leaves the text alone."""
  c.data.name = name
  c.data.image_size = image_size
  c.model.image_size = image_size
  c.data.tokenizer.vocab_file = ""    # set: bert-base-uncased vocab.txt
  c.data.aug.crop_scale = (0.5, 1.0)
  c.data.aug.flip_swap = ()
  c.init.checkpoint = ""              # required: an official .pth or a workdir


def epochs(c: ml_collections.ConfigDict, train_records: int, num_epochs: int) -> None:
  """`num_epochs` over `train_records` at `c.batch_size`: evaluated after each epoch, the
  distillation weight ramped over the first (the official `warm_up`)."""
  steps_per_epoch = train_records // c.batch_size
  c.total_steps = num_epochs * steps_per_epoch
  c.alpha_warmup_steps = steps_per_epoch
  c.log_every_steps = 100
  c.eval_every_steps = steps_per_epoch


def shapes_input(c: ml_collections.ConfigDict, *, max_len: int, val_size: int,
                 test_size: int) -> None:
  """The shapes world at 64 px on 2 loader threads; whole images (a crop could cut out an
  object the text counts or names) and no RandAugment (its colour ops could change a
  colour the text names)."""
  c.data.image_size = 64
  c.data.max_len = max_len
  c.data.shapes.update(val_size=val_size, test_size=test_size)
  c.data.aug.update(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), randaug_n=0)
  c.data.loader.update(num_threads=2, prefetch_buffer_size=64)


def shapes_run(c: ml_collections.ConfigDict, *, total_steps: int, eval_every_steps: int,
               lr: float, warmup_steps: int) -> None:
  """The CPU-sized shapes-world run: batch 32, gradients clipped at norm 1, cosine from
  `lr` after `warmup_steps` to 1e-5, one checkpoint at the end."""
  c.batch_size = 32
  c.total_steps = total_steps
  c.optimizer.lr = lr
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.schedule.update(warmup_steps=warmup_steps, end_lr=1e-5)
  c.log_every_steps = 25
  c.eval_every_steps = eval_every_steps
  c.checkpoint_every_steps = total_steps
