"""SIMLA NLVR2 text-assignment pretraining (official Pretrain_NLVR.py, NLVR_pretrain.yaml).

  python run.py --config=configs/simla_nlvr_pretrain.py      # shapes captions, from runs/simla
  python run.py --config=configs/simla_nlvr_pretrain.py:official --config.init.checkpoint=CKPT \
      --config.data.tokenizer.vocab_file=bert-base-uncased/vocab.txt \
      --config.data.captions.train_files='("cc3m.json", ...)' --config.data.captions.image_root=.

Each caption of an image-caption batch is paired with two images, its own on the left
(label 0), on the right (label 1), or neither (label 2), the others drawn by image-image
similarity (simla_jax.tasks.nlvr). The two-image encoder is built from the pretraining
checkpoint (`init.checkpoint`, a workdir or an official .pth): pretrained BERT layers
[0, nlvr.duplicate_from) kept, the rest duplicated (simla_jax.models.nlvr_encoder).

Variants: default (shapes-world captions, CPU-sized), official (the 4M pretraining set,
256 px, 1 epoch, AdamW lr 2e-5, batch 32 x 8 GPUs, captions cut at 25 tokens).
"""

import ml_collections

from configs import finetune

PRETRAIN_4M_PAIRS = 5_100_000   # official 4M set (image-caption pairs, approximate)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in ("default", "official"):
    raise ValueError(f"configs/simla_nlvr_pretrain.py: unknown variant {variant!r} "
                     f"(default | official)")
  # init.checkpoint: the workdir of `python run.py --config=configs/simla.py`.
  c = finetune.base("simla_nlvr_pretrain", checkpoint="runs/simla")
  c.nlvr = ml_collections.ConfigDict(dict(
      # First duplicated pretrained layer; -1 = layers // 2 (the official 6 of 12; 1 of
      # the CPU model's 3: NLVR layers (0, 1, 1, 2, 2) of the pretrained stack).
      duplicate_from=-1,
  ))
  c.data.mim.num_masking_patches = 0  # the caption pipeline's MIM mask is not read
  c.text_only = False
  c.eval = ml_collections.ConfigDict(dict(
      splits=("val",),                # text-assignment accuracy on fixed draws
      final_splits=(),
      batch_size=32,                  # negatives come from the batch: the training size
  ))

  if variant == "official":
    finetune.official_input(c, "captions", image_size=256)
    c.data.max_len = 25               # tokenizer(..., max_length=25)
    c.data.aug.translate_const = 10.0
    c.data.loader.update(worker_count=8, num_threads=8, prefetch_buffer_size=256)
    c.batch_size = 256                # NLVR_pretrain.yaml: 32 per GPU, 8 GPUs
    c.total_steps = PRETRAIN_4M_PAIRS // c.batch_size   # 1 epoch
    c.eval.splits = ()
    c.optimizer.lr = 2e-5
    c.optimizer.schedule.update(warmup_steps=1000, warmup_init_lr=1e-5, end_lr=1e-6)
    c.log_every_steps = 100
    c.eval_every_steps = c.total_steps
    c.checkpoint_every_steps = 5000
    return c

  # Shapes world, CPU-sized: the pretraining run's captions and augmentation.
  c.data.image_size = 64
  c.data.max_len = 24
  c.data.shapes.update(val_size=128, test_size=128)
  c.data.loader.update(num_threads=2, prefetch_buffer_size=64)
  finetune.shapes_run(c, total_steps=300, eval_every_steps=300, lr=3e-4, warmup_steps=20)
  return c
