"""SIMLA weakly-supervised grounding (official Grounding.py, configs/Grounding.yaml).

  python run.py --config=configs/simla_grounding.py           # shapes world, from runs/simla
  python run.py --config=configs/simla_grounding.py:refcoco --config.init.checkpoint=simla_4m.pth \
      --config.data.tokenizer.vocab_file=bert-base-uncased/vocab.txt \
      --config.data.refcoco.train_file=data/refcoco+_train.json \
      --config.data.refcoco.eval_files.val=data/refcoco+_val.json \
      --config.data.refcoco.eval_files.test=data/refcoco+_test.json \
      --config.data.refcoco.refer_dir=data/refcoco+ --config.data.refcoco.det_file=data/refcoco+/dets.json \
      --config.data.refcoco.coco_file=data/refcoco+/cocos.json --config.data.refcoco.image_root=coco

Fine-tuning is the retrieval recipe (ITC with image-id positives + ITM with negatives of
other images) on (image, referring expression) pairs; the evaluation grounds each
expression by Grad-CAM (`grounding.mode`: itm at BERT layer `grounding.layer`, official
8; itc at ViT block `grounding.itc_block`) and picks the proposal with the highest
sum(map in box) / area^alpha. Variants: default (shapes world), refcoco (official files
and recipe: 384 px, lr 1e-5, 5 epochs, batch 32).
"""

import ml_collections

from configs import finetune
from configs import simla_retrieval

REFCOCO_TRAIN_PAIRS = 120_624   # expressions of the official refcoco+_train.json


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in ("default", "refcoco"):
    raise ValueError(f"configs/simla_grounding.py: unknown variant {variant!r} "
                     f"(default | refcoco)")
  c = simla_retrieval.get_config("default")
  c.family = "simla_grounding"
  c.eval_only = False                 # True: score init.checkpoint as it is, no fine-tuning
  del c.finetune_images
  c.grounding = ml_collections.ConfigDict(dict(
      mode="itm",                     # itm: cross-attention Grad-CAM; itc: ViT self-attention
      layer=8,                        # BERT layer of the itm mode (0-based; official 8)
      itc_block=-1,                   # ViT block of the itc mode (negative: from the end)
      alpha=0.5,                      # proposal score = sum(map in box) / area^alpha
      also_itc=True,                  # score the itc mode next to `mode` (val/test *_itc_acc)
      heatmaps=8,                     # examples drawn to <workdir>/heatmaps at the end
      all_layers=True,                # also score every layer / block (<split>_itm<k>_acc)
  ))
  c.data.grounding = ml_collections.ConfigDict(dict(num_distractors=4))  # shapes proposals
  c.data.refcoco = ml_collections.ConfigDict(dict(
      train_file="",                  # refcoco+_train.json
      eval_files=ml_collections.ConfigDict(dict(val="", test="")),  # refcoco+_{val,test}.json
      refer_dir="",                   # holds refs(unc).p and instances.json
      det_file="",                    # dets.json: detector proposals per image
      coco_file="",                   # cocos.json: ground-truth COCO boxes ('' = not scored)
      image_root="",                  # COCO images; records' "image" is relative to it
      check_images=True,              # look for every image file before training
  ))
  c.train_images = 0                  # shapes world: train images (one expression per object)
  c.eval = finetune.eval_splits(batch_size=64)

  if variant == "refcoco":
    finetune.official_input(c, "refcoco")
    c.data.aug.translate_const = 10.0
    c.data.loader.worker_count = 8
    c.batch_size = 64                 # Grounding.yaml 32 per GPU; README: 2 GPUs
    c.queue_size = 65536
    c.eval.batch_size = 32
    c.grounding.all_layers = False    # 12 + 12 upsampled maps per expression: slow
    finetune.epochs(c, REFCOCO_TRAIN_PAIRS, 5)
    c.optimizer.lr = 1e-5
    c.optimizer.schedule.end_lr = 1e-6
    c.checkpoint_every_steps = 2000
    return c

  # Shapes world, CPU-sized: fine-tunes the default pretraining run (runs/simla), whose
  # BERT has 3 layers (block 8 does not exist).
  c.data.name = "shapes"
  # Chosen on val (mean of seeds 0-2 after 300 steps, README) from the current default
  # pretraining (init_std 0.05, half-random ITM negatives): itm layer 2 = the last (val
  # 47.5 %; layer 0 42.4 %), itc block 2 = the last (53.1 %). From the older 9eef9ec
  # checkpoint, whose ITM head never learned, layer 1 / block 1 were best.
  c.grounding.layer = -1              # the last of the default 3 layers
  c.grounding.itc_block = -1
  # The longest expression is 13 words. Flips swap left / right in the expression.
  finetune.shapes_input(c, max_len=20, val_size=100, test_size=200)
  c.train_images = 2000               # ~5,000 expressions: an epoch = 156 steps
  finetune.shapes_run(c, total_steps=300, eval_every_steps=150, lr=3e-4, warmup_steps=0)
  c.queue_size = 256
  c.alpha_warmup_steps = 156
  return c
