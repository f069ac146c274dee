"""SIMLA image-text retrieval fine-tuning (official Retrieval.py) and evaluation.

  python run.py --config=configs/simla_retrieval.py          # shapes world, from runs/simla
  python run.py --config=configs/simla_retrieval.py:flickr --config.init.checkpoint=simla_4m.pth \
      --config.data.tokenizer.vocab_file=bert-base-uncased/vocab.txt \
      --config.data.captions.train_files='("flickr30k_train.json",)' \
      --config.data.captions.image_root=flickr30k --config.eval.files.val=flickr30k_val.json \
      --config.eval.files.test=flickr30k_test.json
  python run.py --config=configs/simla_retrieval.py:eval --config.init.checkpoint=CKPT \
      --config.eval.files.test=flickr30k_test.json --config.data.captions.image_root=flickr30k ...

Variants: default (shapes world; starts from the workdir the README's pretraining
command writes), coco, flickr (official recipes: 384 px, lr 1e-5 -> 1e-6 cosine,
5 / 10 epochs, k_test 256 / 128), eval (score a checkpoint on an ALBEF eval JSON, no
training: the zero-shot Flickr protocol with the COCO-finetuned checkpoint).
`init.checkpoint`: a workdir of this project (its config.json defines the model) or
an official .pth (the model is `config.model`).
"""

import ml_collections

from configs import common
from configs import simla_model
from simla_jax.data import default_data_config

# Records (one caption each) of the official retrieval train JSONs, for epoch lengths.
TRAIN_PAIRS = {"coco": 566_747, "flickr": 145_000}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in ("default", "coco", "flickr", "eval"):
    raise ValueError(f"configs/simla_retrieval.py: unknown variant {variant!r} "
                     f"(default | coco | flickr | eval)")
  c = common.base()
  c.family = "simla_retrieval"
  c.seed = 0
  c.eval_only = False                 # True: score init.checkpoint on eval.final_splits only
  c.init = ml_collections.ConfigDict(dict(
      checkpoint="runs/simla",        # workdir of `python run.py --config=configs/simla.py`
  ))
  c.data = default_data_config()
  c.data.max_len = 30                 # official retrieval text length
  c.data.mim.num_masking_patches = 0  # fine-tuning reads no MIM mask
  # The network when init.checkpoint is an official .pth (a workdir's config.json wins).
  c.model = simla_model.model_config("base")
  c.loss_weights = ml_collections.ConfigDict(dict(itc=1.0, itm=1.0))
  c.alpha = 0.4                       # momentum-distillation weight
  c.alpha_warmup_steps = 0            # ramp 0 -> alpha over the first epoch (`warm_up: True`)
  c.queue_size = 65536
  # ITM hard negatives: "device" draws within each data-parallel shard (the official per-GPU
  # sampling), "global" from the whole batch.
  c.itm = ml_collections.ConfigDict(dict(negatives_from="device"))
  c.compat = ml_collections.ConfigDict(dict(
      idx_queue_frozen=False))        # True: the official code's never-updated id queue
  c.finetune_images = 0               # shapes world: train images used (x captions_per_image)
  c.eval = ml_collections.ConfigDict(dict(
      splits=("val",),                # read during training (model selection)
      final_splits=("test",),         # scored once, after the last step
      minimal_pairs=(),               # shapes splits also scored as 2-way caption choices
      k_test=128, batch_size=128,
      files=ml_collections.ConfigDict(dict(val="", test="")),   # ALBEF eval JSON per split
  ))

  c.optimizer.name = "adamw"
  c.optimizer.weight_decay = 0.02
  c.optimizer.no_decay = (r".*bias$", r".*scale$")
  c.optimizer.schedule.name = "cosine"

  if variant in ("coco", "flickr", "eval"):
    c.data.name = "captions"
    c.data.image_size = 384
    c.model.image_size = 384          # pretraining positions are interpolated to 24x24
    c.data.tokenizer.vocab_file = ""  # set: bert-base-uncased vocab.txt
    c.data.aug.crop_scale = (0.5, 1.0)
    c.data.aug.flip_swap = ()         # the official transform flips without touching text
    c.data.aug.translate_const = 10.0
    c.data.loader.worker_count = 8
    c.init.checkpoint = ""            # required: an official .pth or a workdir
    c.batch_size = 64                 # 32 per GPU x 2 GPUs (README commands)
    c.eval.k_test = 256 if variant == "coco" else 128
    c.eval.batch_size = 64
    if variant == "eval":
      c.eval_only = True
      return c
    epochs = 5 if variant == "coco" else 10
    steps_per_epoch = TRAIN_PAIRS[variant] // c.batch_size
    c.total_steps = epochs * steps_per_epoch
    c.alpha_warmup_steps = steps_per_epoch
    c.optimizer.lr = 1e-5
    c.optimizer.schedule.end_lr = 1e-6   # warmup_lr == lr: no warmup
    c.log_every_steps = 100
    c.eval_every_steps = steps_per_epoch
    c.checkpoint_every_steps = 2000
    return c

  # Shapes world, CPU-sized: fine-tunes the default pretraining run (runs/simla).
  c.data.image_size = 64
  c.data.shapes.update(val_size=200, test_size=200, comp_size=200, strict_size=200)
  c.data.loader.update(num_threads=2, prefetch_buffer_size=64)
  c.finetune_images = 2000            # 10,000 (image, caption) pairs: an epoch = 312 steps
  c.batch_size = 32
  c.queue_size = 256
  c.total_steps = 300
  c.alpha_warmup_steps = 300
  # Chosen on val (seed 0, r_mean after 300 steps): 3e-4 58.2, 1e-4 54.4, 3e-5 53.1.
  c.optimizer.lr = 3e-4
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.schedule.end_lr = 1e-5
  c.log_every_steps = 25
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 300
  c.eval.update(k_test=16, batch_size=128, final_splits=("test", "comp", "strict"),
                minimal_pairs=("test", "comp", "strict"))
  return c
