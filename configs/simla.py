"""SIMLA pretraining.

  python run.py --config=configs/simla.py          # shapes world, CPU-sized (default)
  python run.py --config=configs/simla.py:paper    # official sizes and hyperparameters, from
                                                   # DeiT-B/16 + bert-base-uncased (config.init)
  python run.py --config=configs/simla.py:albef    # the ALBEF baseline at the default size

Default: a small ViT + BERT pretrained with all five objectives on the procedural
shapes world (no download), evaluated by zero-shot retrieval on the held-out test
split and on the compositional split (colour-shape pairs never seen in training).
"""

import ml_collections

from configs import common
from configs import simla_model
from simla_jax import pretrained
from simla_jax.data import default_data_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in ("default", "paper", "tiny", "albef"):
    raise ValueError(f"configs/simla.py: unknown variant {variant!r} "
                     f"(default | tiny | paper | albef)")
  c = common.base()
  c.family = "simla"
  c.seed = 0

  c.data = default_data_config()
  c.init = pretrained.init_config()   # public weights: "" = random init
  c.model = simla_model.model_config("small" if variant in ("default", "albef") else
                                     "base" if variant == "paper" else "tiny")
  c.model.bert.vocab_size = -1        # -1: the tokenizer's vocabulary
  c.model.codebook_size = -1          # -1: the MIM targets' codebook

  c.loss_weights = ml_collections.ConfigDict(dict(itc=1.0, itm=1.0, mlm=1.0, mim=1.0, psl=1.0))
  c.alpha = 0.4                       # momentum-distillation weight
  c.alpha_warmup_steps = 1000         # linear ramp 0 -> alpha ("the first epoch")
  c.queue_size = 4096                 # multiple of the global batch
  c.psl = ml_collections.ConfigDict(dict(layer=-1, per_head=4, num_keywords=5))
  # ITM hard negatives: "device" draws each row's negatives among the rows of its own
  # data-parallel shard (the official code samples per GPU: 63 candidates at 8 x 64);
  # "global" among the whole global batch (harder negatives, more false negatives).
  # random_negatives: the fraction of rows whose negatives are drawn uniformly instead of
  # from the softmax of the ITC similarities (0: the official hard negatives).
  c.itm = ml_collections.ConfigDict(dict(negatives_from="device", random_negatives=0.0))
  # MLM vocabulary logits only at masked positions: per group of `group_rows` rows (a group
  # stays on one device), up to `capacity` positions; a group with more masked tokens
  # computes every position (exact either way). capacity 0: logits at every position.
  c.mlm_capacity = ml_collections.ConfigDict(dict(group_rows=8, capacity=64))
  # ITM: the 3B (text, image) pairs use B images; project each image to cross-attention
  # keys/values once per layer and gather them per pair (base: -4.9 % FLOPs; same collective
  # bytes as False on 8 data-parallel devices). False: project every pair's image copy.
  c.share_image_kv = True
  c.compat = ml_collections.ConfigDict(dict(
      mlm_distill_over_sequence=False))  # True: the official log_softmax(dim=1) bug
  c.eval = ml_collections.ConfigDict(dict(splits=("test", "comp"), k_test=16, batch_size=128))

  c.optimizer.name = "adamw"
  c.optimizer.lr = 1e-4
  c.optimizer.weight_decay = 0.02
  # As the official optimizer factory: no decay for biases and 1-D params (LayerNorm).
  c.optimizer.no_decay = (r".*bias$", r".*scale$")
  c.optimizer.schedule.name = "cosine"

  if variant == "paper":
    c.batch_size = 512
    c.queue_size = 65536
    c.data.name = "captions"
    c.data.image_size = 256
    c.data.max_len = 25
    # The official start (spec §1.1): DeiT-B/16 ViT, bert-base-uncased BERT and vocabulary.
    # Paths are relative to the working directory; override them on the command line.
    c.init.vit = "weights/deit_base_patch16_224-b5f2ef4d.pth"
    c.init.bert = "weights/bert-base-uncased/pytorch_model.bin"
    c.data.tokenizer.vocab_file = "weights/bert-base-uncased/vocab.txt"
    c.data.aug.crop_scale = (0.2, 1.0)
    c.data.aug.flip_swap = ()
    c.data.aug.translate_const = 10.0
    c.data.mim.num_masking_patches = 75
    c.data.mim.min_num_patches = 16
    c.data.mim.target = "dvae"
    c.data.mim.dvae_image_size = 128
    c.data.loader.worker_count = 8
    c.steps_per_epoch = 4_000_000 // 512        # CC + SBU + COCO + VG, 4M pairs
    c.total_steps = 30 * c.steps_per_epoch
    c.alpha_warmup_steps = c.steps_per_epoch
    c.optimizer.schedule.update(warmup_steps=2000, warmup_init_lr=1e-5, end_lr=1e-5)
    c.log_every_steps = 100
    c.eval_every_steps = c.steps_per_epoch
    c.checkpoint_every_steps = 2000
    c.eval.splits = ("val",)
    c.eval.k_test = 128
    c.mesh.update(data=-1, fsdp=1, model=1)
    return c

  # CPU-sized runs on the shapes world.
  c.data.image_size = 64
  c.data.shapes.update(val_size=200, test_size=200, comp_size=200)
  if variant == "tiny":      # tests
    c.data.image_size = 32
    c.data.mim.codebook_size = 64
    c.data.mim.num_masking_patches = 1
    c.data.mim.min_num_patches = 1
    c.data.shapes.update(val_size=16, test_size=16, comp_size=16)
    c.model.bert.layers = 2
    c.batch_size = 8
    c.itm.negatives_from = "global"   # one example per shard on the 8 test devices
    c.queue_size = 32
    c.total_steps = 30
    c.log_every_steps = 5
    c.eval_every_steps = 30
    c.checkpoint_every_steps = 30
    c.alpha_warmup_steps = 10
    c.eval.update(k_test=4, batch_size=16)
    c.optimizer.lr = 1e-3
    c.optimizer.schedule.warmup_steps = 5
    return c

  c.data.max_len = 24                 # 90 % of shapes captions fit
  # ITM: with only hard negatives the small model never beats the 2:1 prior of "no match"
  # in 1,000 steps (train accuracy 0.667 throughout, re-ranking lowered R@1); half the rows
  # take a uniformly drawn negative instead (README, "What the default runs show").
  c.itm.random_negatives = 0.5
  # rbg keys: the dropout masks compile in far less time than threefry's (CPU).
  c.rng_impl = "rbg"
  c.eval.splits = ("val", "test", "comp")
  # Two grain threads build the next two batches (64 examples) while XLA runs a step.
  c.data.loader.update(num_threads=2, prefetch_buffer_size=64)
  c.model.vit.update(width=128, depth=3, heads=4, mlp_dim=512)
  # No BERT dropout at this size (1,000 steps from scratch): each dropout site adds mask and
  # key-derivation kernels to the step XLA:CPU compiles (1,089 -> 856 kernels, -16 % compile
  # CPU s); one full run without it: test R@1 49.5 / 41.5 re-ranked (46.5 / 40.0 with it),
  # ITC-only 55.0 / 50.9 (58.0 / 51.8) (benchmarks/README.md, "first step").
  c.model.bert.update(hidden=128, layers=3, heads=4, ffn=512, dropout=0.0,
                      attention_dropout=0.0)
  # At 3 layers a scan saves no compile time and costs ~14 % step time (benchmarks/README.md,
  # "SIMLA compile time"); `paper` (model size base) scans.
  c.model.scan_layers = False
  c.model.embed_dim = 64
  # BERT's 0.02 is sized for width 768; at width 128 it leaves the text [CLS] almost
  # constant at init (2 % change across captions, 2.6 % when the image is swapped), so
  # ITC and ITM start without signal. 0.02 * sqrt(768 / 128) keeps BERT-base's relative
  # scale (15 % / 16 %).
  c.model.init_std = 0.05
  # A few hundred steps from scratch: the momentum copies and the queue must follow
  # the online encoders closely (0.995 and a 2k queue lag by ~200 steps, so ITC
  # contrasts against near-initial, almost identical text features for most of the run).
  c.model.momentum = 0.95
  c.batch_size = 32
  c.queue_size = 256
  c.total_steps = 1000                # test R@1 TR 24.0 / IR 12.3 % (chance 0.5 %); 9 min idle
  c.log_every_steps = 25
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  c.alpha_warmup_steps = 200
  c.optimizer.lr = 1e-3
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.schedule.update(warmup_steps=100, end_lr=1e-5)
  if variant == "albef":
    # ALBEF (spec §5) in the same loop, data and evaluators: the same BERT depth budget
    # split into text layers [0, layers // 2) and fusion layers (3 layers: 1 text + 2
    # fusion), ITC with momentum distillation + ITM with hard negatives + MLM on the image;
    # no MIM and no PSL (the step skips a loss of weight 0, the model has no such heads).
    c.model.architecture = "albef"
    c.model.bert.fusion_start = -1
    c.loss_weights.update(mim=0.0, psl=0.0)
  return c
