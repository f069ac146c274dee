"""SIMLA VQA fine-tuning (official VQA.py): answer decoder, answer-list ranking.

  python run.py --config=configs/simla_vqa.py          # shapes world, from runs/simla
  python run.py --config=configs/simla_vqa.py --config.question_only=True   # image zeroed
  python run.py --config=configs/simla_vqa.py:vqa --config.init.checkpoint=simla_4m.pth \
      --config.data.tokenizer.vocab_file=bert-base-uncased/vocab.txt \
      --config.data.vqa.files.train=vqa_train.json,vqa_val.json,vg_qa.json \
      --config.data.vqa.files.test=vqa_test.json --config.data.vqa.answer_list=answer_list.json \
      --config.data.vqa.vqa_root=coco --config.data.vqa.vg_root=visual_genome

Variants: default (shapes-world questions from the scene graph, closed answer list;
starts from the workdir the README's pretraining command writes), vqa (official
recipe: 384 px, 6-layer decoder from encoder layers 6-11, AdamW lr 2e-5, cosine,
8 epochs, distillation alpha 0.4, k_test 128; the EvalAI result JSON of the test
file). `init.checkpoint`: a workdir of this project (its config.json defines the
model) or an official .pth (the model is `config.model`).
"""

import ml_collections

from configs import finetune

VQA_TRAIN_QUESTIONS = 1_268_000   # vqa_train + vqa_val + vg_qa records, approximately


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in ("default", "vqa"):
    raise ValueError(f"configs/simla_vqa.py: unknown variant {variant!r} (default | vqa)")
  # init.checkpoint: the workdir of `python run.py --config=configs/simla.py`.
  c = finetune.base("simla_vqa", checkpoint="runs/simla")
  c.data.mim.num_masking_patches = 0  # fine-tuning reads no MIM mask
  c.data.answer_max_len = 6           # [CLS] answer [SEP] tokens, padded
  c.data.max_answers = 1              # distinct training answers per question (weights)
  c.data.vqa = ml_collections.ConfigDict(dict(
      # Official JSON files per split, comma-separated (see simla_jax/data/vqa.py).
      files=ml_collections.ConfigDict(dict(train="", val="", test="")),
      answer_list="",                 # answer_list.json
      vqa_root="",                    # <vqa_root>/<record image> for "vqa" records
      vg_root="",                     # <vg_root>/<record image> for "vg" records
      max_words=30,                   # question words kept (official pre_question)
      check_images=True,              # look for every image before training
      on_error="error",               # error | skip (bad JSON lines / records / images)
      outside_list="error",           # training answer not in the list: error | skip | keep
  ))
  # Decoder layers i = encoder layers first_layer + i (official: 6 from layers 6-11).
  c.decoder = ml_collections.ConfigDict(dict(layers=6, first_layer=6))
  c.distill = True                    # momentum distillation (official `distill: True`)
  c.alpha = 0.4
  c.alpha_warmup_steps = 0            # linear ramp 0 -> alpha over the first epoch
  c.compat = ml_collections.ConfigDict(dict(
      alpha_not_passed=False,         # True: official bug, distillation weight stays 0
      distill_over_sequence=False,    # True: official bug, log_softmax over the sequence
      rank_first_token_twice=False,   # True: official ranking score (first token counted twice)
  ))
  c.k_test = 128                      # answers re-ranked by full log-likelihood
  c.question_only = False             # True: images zeroed (the question-only baseline)
  c.train_images = 0                  # shapes world: train images (5 questions each)
  c.majority_questions = 0            # shapes: train questions counted for the majority (0 all)
  c.eval = finetune.eval_splits(
      batch_size=128, result_splits=("test",))   # written as vqa_result_<split>.json

  if variant == "vqa":
    finetune.official_input(c, "vqa")
    c.data.max_len = 35               # official: questions cut to 25 tokens in training
    c.data.answer_max_len = 10
    c.data.max_answers = 10           # VQA: up to 10 distinct human answers
    c.data.vqa.outside_list = "keep"  # the official code trains on every human answer
    c.data.loader.update(worker_count=8, num_threads=8, prefetch_buffer_size=256)
    c.eval.splits = ()                # official: no validation during training
    c.eval.final_splits = ()
    c.batch_size = 256                # VQA.yaml: 32 per GPU, 8 GPUs
    c.eval.batch_size = 64
    finetune.epochs(c, VQA_TRAIN_QUESTIONS, 8)
    c.optimizer.lr = 2e-5
    c.optimizer.schedule.update(warmup_steps=400, warmup_init_lr=1e-5, end_lr=1e-6)  # 4 x 100 its
    c.checkpoint_every_steps = 1000
    return c

  # Shapes world, CPU-sized: fine-tunes the default pretraining run (runs/simla), whose
  # 3-layer BERT gives the decoder its last 2 layers (the official top half, 6-11 of 12).
  c.decoder.update(layers=2, first_layer=1)
  c.k_test = 8                        # of 28 answers
  # The longest question is 19 words; 600 questions per eval split. Flips swap left /
  # right in the question.
  finetune.shapes_input(c, max_len=24, val_size=120, test_size=120)
  c.train_images = 2000               # 10,000 questions: an epoch = 312 steps
  # lr val-selected over {1e-4, 3e-4} (README).
  finetune.shapes_run(c, total_steps=300, eval_every_steps=100, lr=1e-4, warmup_steps=20)
  c.alpha_warmup_steps = 312
  return c
