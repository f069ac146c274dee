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

from configs import finetune

# Records (one caption each) of the official retrieval train JSONs, for epoch lengths.
TRAIN_PAIRS = {"coco": 566_747, "flickr": 145_000}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in ("default", "coco", "flickr", "eval"):
    raise ValueError(f"configs/simla_retrieval.py: unknown variant {variant!r} "
                     f"(default | coco | flickr | eval)")
  # init.checkpoint: the workdir of `python run.py --config=configs/simla.py`.
  c = finetune.base("simla_retrieval", checkpoint="runs/simla")
  c.eval_only = False                 # True: score init.checkpoint on eval.final_splits only
  c.data.max_len = 30                 # official retrieval text length
  c.data.mim.num_masking_patches = 0  # fine-tuning reads no MIM mask
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
  c.eval = finetune.eval_splits(
      batch_size=128, k_test=128,
      minimal_pairs=(),               # shapes splits also scored as 2-way caption choices
      files=ml_collections.ConfigDict(dict(val="", test="")))   # ALBEF eval JSON per split

  if variant in ("coco", "flickr", "eval"):
    finetune.official_input(c, "captions")
    c.data.aug.translate_const = 10.0
    c.data.loader.worker_count = 8
    c.batch_size = 64                 # 32 per GPU x 2 GPUs (README commands)
    c.eval.k_test = 256 if variant == "coco" else 128
    c.eval.batch_size = 64
    if variant == "eval":
      c.eval_only = True
      return c
    finetune.epochs(c, TRAIN_PAIRS[variant], 5 if variant == "coco" else 10)
    c.optimizer.lr = 1e-5
    c.optimizer.schedule.end_lr = 1e-6   # warmup_lr == lr: no warmup
    c.checkpoint_every_steps = 2000
    return c

  # Shapes world, CPU-sized: fine-tunes the default pretraining run (runs/simla).
  c.data.image_size = 64
  c.data.shapes.update(val_size=200, test_size=200, comp_size=200, strict_size=200)
  c.data.loader.update(num_threads=2, prefetch_buffer_size=64)
  c.finetune_images = 2000            # 10,000 (image, caption) pairs: an epoch = 312 steps
  # lr chosen on val (seed 0, r_mean after 300 steps): 3e-4 58.2, 1e-4 54.4, 3e-5 53.1.
  finetune.shapes_run(c, total_steps=300, eval_every_steps=100, lr=3e-4, warmup_steps=0)
  c.queue_size = 256
  c.alpha_warmup_steps = 300
  c.eval.update(k_test=16, batch_size=128, final_splits=("test", "comp", "strict"),
                minimal_pairs=("test", "comp", "strict"))
  return c
