"""MvCoM face recognition: `python run.py --config=configs/mvcom.py[:variant[,variant]]`.

Default: biased synthetic faces (face_jax/data/synthetic.py), a small IResNet, CosFace
with the MvCoM learned margin; a 2-core CPU finishes it in about 10 minutes.

Variants (comma-separated, applied in order):
  cosface              plain CosFace (s, m0), no learned margin
  arcface              plain ArcFace (margin in the angle)
  fixed_group_margins  CosFace with hand-set larger margins for the minority groups
  ldam                 CosFace with a hand-set LDAM-style class-prior margin (rare ids larger)
  balanced             CosFace with group-balanced sampling
  l2rw                 CosFace with learning-to-reweight weights from the meta set
  predicted            MvCoM with attributes predicted by auxiliary heads (not oracle)
  prototype            MvCoM whose meta objective is the open-set prototype loss on new
                       identities, meta batch stratified by group (face_jax/steps.py)
  mwnet                meta optimiser as Meta-Weight-Net: Adam 1e-3, weight decay 1e-4
  joint_bias           the world of issue 15: crowded minorities, group x variation rates,
                       look-alike identities, continuous variation degrees, training long
                       enough for the margin to bind (no hand-set margin moved its worst group)
  tight                after joint_bias: identities 2.3x tighter (jitter 0.15) and the
                       minorities more crowded, so the learned representation, not the
                       rendering noise, limits accuracy
  nuisance             after tight: every image adds a 16-d nuisance code in its own,
                       group-mixed render directions, which a model can learn to discard
                       only from its group's images
  paper                IResNet-100 on an MS1MV2-style .rec (insightface recipe); set
                       data.rec_prefix / meta_rec_prefix / val_bins to your files
"""

import ml_collections

from configs import common

VARIANTS = ("cosface", "arcface", "fixed_group_margins", "ldam", "balanced", "l2rw", "predicted",
            "prototype", "mwnet", "joint_bias", "tight", "nuisance", "paper")


def get_config(arg=None) -> ml_collections.ConfigDict:
  c = common.base()
  c.family = "mvcom"
  c.seed = 0
  c.batch_size = 128
  c.total_steps = 500
  c.log_every_steps = 25
  c.eval_every_steps = 250
  c.checkpoint_every_steps = 250

  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.05
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.optimizer.no_decay = (r".*bias$", r".*(scale|alpha).*")   # BN and PReLU parameters
  c.optimizer.schedule.name = "polynomial"                     # arcface_torch: linear to 0
  c.optimizer.schedule.warmup_steps = 50
  c.optimizer.schedule.power = 1.0
  c.optimizer.schedule.end_lr = 0.0

  # Backbone: IResNet; `arch` picks an insightface depth (r18..r200), else `layers`.
  # scan_layers: each stage's blocks after the first as one nn.scan (compile time flat in
  # depth); the default's stages have one block each, so it only matters for deeper nets.
  c.model = ml_collections.ConfigDict(dict(
      arch="", layers=(1, 1, 1, 1), widths=(16, 32, 64, 128), embed_dim=64,
      dropout=0.0, dtype="float32", remat=False, scan_layers=True))

  c.data = ml_collections.ConfigDict(dict(
      name="synthetic",          # synthetic | real
      # --- synthetic biased faces (face_jax/data/synthetic.py) ---
      image_size=24, channels=3,
      frequencies=6,             # cosine basis frequencies per axis (6 -> 36 basis fields)
      code_dim=16,               # identity code dimension
      gain=1.5,                  # field contrast before tanh
      tint=0.3,                  # per-group colour offset range
      jitter=0.35,               # intra-identity code noise
      nuisance_dim=0,            # per-image nuisance code in its own render directions
      nuisance_scale=0.5,        # its standard deviation (identity codes: group_spread)
      pixel_noise=0.05,
      group_fractions=(0.82, 0.15, 0.03),   # training identity mix
      group_spread=(1.0, 1.0, 1.0),         # identity-code scale per group
      group_specificity=(0.0, 0.7, 0.9),    # weight of each group's own render subspace
      num_train_ids=2000, images_per_id=(4, 8),
      images_per_id_by_group=(),  # one (lo, hi) per group; () -> images_per_id
      meta_ids_per_group=12, meta_images_per_id=4,
      meta_ids_by_group=(),      # one count per group (an unbalanced meta set); () -> the above
      test_ids_per_group=150, test_images_per_id=10, pairs_per_cell=3000,
      train_variation_rate=0.1, meta_variation_rate=0.5, test_variation_rate=0.3,
      train_variation_rates=(),  # per group (pose, occlusion, blur) rates; () -> the rate above
      meta_variation_rates=(),   # the same for the meta split
      variation_degrees=False,   # record a continuous degree per variation (scales it)
      degree_min=0.3,            # degrees ~ U(degree_min, 1)
      hard_fraction=(0.0, 0.0, 0.0),   # look-alike identities per group
      hard_distance=0.5,         # look-alike code = sqrt(1-d^2) z_partner + d z_own
      meta_identities="train",   # train: held-out images of training ids | heldout: new ids
      meta_sampling="uniform",   # uniform | stratified (equal ids per group, all their images)
      group_variation_pairs=False,   # also test pairs per group x variation cell
      pose_shift=4,              # px
      pose_ramp=0.5,             # illumination ramp amplitude
      occlusion_fraction=0.4,    # of the image height
      blur_sigma=1.2,            # px
      # --- real faces (face_jax/data/pipeline.py, face_jax/real_data_task.py) ---
      rec_prefix="",             # .../faces_emore/train -> train.rec, train.idx, property
      image_root="",             # or root/<identity>/<image> (when rec_prefix is "")
      meta_rec_prefix="",        # held-out images of training identities (mvcom, l2rw)
      group_of_class="",         # optional .npy (num_classes,) group id per identity
      val_bins=(),               # verification packs, e.g. (".../lfw.bin", ".../cfp_fp.bin")
      group_bins=(),             # names of packs that form groups, e.g. RFW's four
      max_bad_fraction=1e-4,     # stop when more records than this fraction are bad
      read_threads=8,            # decoding threads
      worker_count=0,            # >0: decode in that many processes
      source="direct",           # direct | tfds: read a build of python -m face_jax.data.build
      tfds_dir="",               # the build's --out
      tfds_name="",              # face_recordio/<name> or face_folder/<name>
      tfds_split="train",
      tfds_meta_split="",        # held-out meta images in the same build (mvcom, l2rw)
      tfds_val_name="",          # face_verification/<name>: its splits are the val packs
      # --- both ---
      meta_batch_size=64,
      sampling="uniform",        # uniform | group_balanced (synthetic only)
      flip=True,                 # random horizontal flip (training)
      prefetch_batches=2,        # batches prepared ahead
  ))

  # insightface margin_list (m1, m2, m3); the learned / per-group margin replaces the
  # `margin_slot` entry, whose configured value is the base margin m0.
  c.loss = ml_collections.ConfigDict(dict(
      s=30.0, m1=1.0, m2=0.0, m3=0.35, margin_slot="m3", straight_through=True))

  c.method = "mvcom"             # plain | fixed_margins | mvcom | l2rw
  # method fixed_margins: m0 + group[g] + sum_v v * flag_v (or degree) + class_prior * q(y)
  c.fixed_margins = ml_collections.ConfigDict(dict(
      group=(0.0, 0.0, 0.0), pose=0.0, occlusion=0.0, blur=0.0, class_prior=0.0))

  c.mvcom = ml_collections.ConfigDict(dict(
      factors=(("group", 3), ("pose", 1), ("occlusion", 1), ("blur", 1)),
      attributes="oracle",       # oracle (from the data) | predicted (attribute heads)
      attr_loss_weight=0.1,      # attribute-head loss weight (predicted)
      bound=0.3,                 # largest margin offset per factor
      class_bound=0.1,           # largest class-prior offset (patent's class-level term;
                                 # its prior is 0 when all identities have equal counts)
      degrees=False,             # binary factors as continuous degrees where the batch has them
      center=True,               # subtract the batch mean offset (learn relative margins)
      meta_objective="ce",       # ce (held-out images of training ids) | prototype (open set)
      meta_lr=1e-2,              # Adam on the margin parameters
      meta_weight_decay=0.0,
      frozen=False,              # ablation: margins fixed at init_offsets, no meta step
      init_offsets=(),           # ((name, offsets), ...) in margin units; default 0 (= m0)
      shuffle_attributes=False,  # ablation: each sample gets another sample's attributes
      meta_every=1,              # bilevel update every k steps
      virtual_lr_scale=1.0,      # virtual step size = scale * current learning rate
      meta_dtype="float32",      # meta passes compute in float32 (bf16 models too) | model
  ))

  c.eval = ml_collections.ConfigDict(dict(
      batch_size=500, n_folds=10, far_targets=(1e-3, 1e-2), flip=True,
      # every pair of each group's test images (face_jax/evaluators.py all_pairs_metrics)
      all_pairs=True, group_fars=(1e-4, 1e-3), global_fmr=1e-3))

  for variant in [v for v in (arg or "").split(",") if v]:
    _apply_variant(c, variant)
  return c


def _apply_variant(c: ml_collections.ConfigDict, variant: str) -> None:
  if variant == "cosface":
    c.method = "plain"
  elif variant == "arcface":
    c.method = "plain"
    c.loss.update(m1=1.0, m2=0.5, m3=0.0, margin_slot="m2")
  elif variant == "fixed_group_margins":
    c.method = "fixed_margins"
    c.fixed_margins.group = (0.0, 0.1, 0.2)
  elif variant == "ldam":
    c.method = "fixed_margins"
    c.fixed_margins.class_prior = 0.1
  elif variant == "balanced":
    c.method = "plain"
    c.data.sampling = "group_balanced"
  elif variant == "l2rw":
    c.method = "l2rw"
  elif variant == "predicted":
    c.mvcom.attributes = "predicted"
  elif variant == "prototype":   # after the world variant: the batch follows its groups
    c.mvcom.meta_objective = "prototype"
    groups = len(c.data.group_fractions)
    ids = min(8, c.data.meta_ids_per_group)      # per group and batch, all their images
    c.data.update(meta_identities="heldout", meta_sampling="stratified",
                  meta_batch_size=groups * ids * c.data.meta_images_per_id)
  elif variant == "mwnet":
    c.mvcom.update(meta_lr=1e-3, meta_weight_decay=1e-4)
  elif variant == "joint_bias":
    _joint_bias_world(c)
  elif variant == "tight":
    _tight_world(c)
  elif variant == "nuisance":
    _nuisance_world(c)
  elif variant == "paper":
    c.batch_size = 512
    c.total_steps = 20 * 5_822_653 // 512          # 20 epochs of MS1MV2
    c.log_every_steps = 50
    c.eval_every_steps = 2000
    c.checkpoint_every_steps = 2000
    c.keep_checkpoints = 3
    c.optimizer.lr = 0.1
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 5e-4
    c.optimizer.schedule.update(name="polynomial", warmup_steps=0, power=1.0, end_lr=0.0)
    c.optimizer.grad_clip_norm = 5.0               # arcface_torch clips the backbone at 5
    c.model.update(arch="r100", embed_dim=512, dtype="bfloat16", remat=True, scan_layers=True)
    c.loss.update(s=64.0, m1=1.0, m2=0.0, m3=0.4, margin_slot="m3")
    c.data.update(name="real", image_size=112, rec_prefix="data/faces_emore/train",
                  meta_rec_prefix="data/faces_emore/meta",
                  val_bins=("data/faces_emore/lfw.bin", "data/faces_emore/cfp_fp.bin",
                            "data/faces_emore/agedb_30.bin"),
                  meta_batch_size=128, prefetch_batches=16, train_variation_rate=0.1)
    # Pose / occlusion / blur come from online augmentation, so they are known exactly;
    # add ("group", G) with data.group_of_class for (pseudo) ethnicity labels.
    c.mvcom.update(attributes="oracle", meta_every=10,
                   factors=(("pose", 1), ("occlusion", 1), ("blur", 1)))
    c.eval.batch_size = 256
  else:
    raise ValueError(f"configs/mvcom.py: unknown variant {variant!r}; known: {', '.join(VARIANTS)}")


def _joint_bias_world(c: ml_collections.ConfigDict) -> None:
  """Several biases at once, sized so training fits its identities (the margin binds)."""
  c.total_steps = 400
  c.data.update(
      num_train_ids=300, images_per_id=(6, 14),   # ~3,000 images: fitted within 400 steps
      group_fractions=(0.85, 0.11, 0.04),
      group_spread=(1.0, 0.75, 0.6),                 # crowded minorities
      hard_fraction=(0.1, 0.3, 0.3), hard_distance=0.5,
      # (pose, occlusion, blur): the majority with more pose, the minorities blurrier and
      # more occluded.
      train_variation_rates=((0.25, 0.05, 0.05), (0.1, 0.2, 0.3), (0.1, 0.3, 0.4)),
      meta_variation_rates=((0.2, 0.2, 0.2),) * 3,
      variation_degrees=True,
      meta_ids_per_group=8, meta_images_per_id=4,   # the minority has 12 training ids
      test_ids_per_group=100, test_images_per_id=8,
      group_variation_pairs=True)
  c.mvcom.degrees = True


def _tight_world(c: ml_collections.ConfigDict) -> None:
  """joint_bias where identity, not rendering noise, limits accuracy.

  In joint_bias (seed 100) verification on the test images' identity codes reaches
  99.4 / 98.6 / 96.9 % per group while CosFace reaches 96.0 / 91.2 / 87.2, and neither a
  global margin (m 0 vs 0.35: worst group -0.7) nor per-group margins moved the worst group
  by 2 points. Chosen on seed 100 (the study runs seeds 0-4) as the probed world where a
  minority margin moved the worst group most (-1.4 points); on seeds 0-2 it moves it by
  -0.5 / -0.4 / -0.4, short of the study's gate (README, MvCoM study).
  """
  _joint_bias_world(c)
  c.data.update(jitter=0.15, group_spread=(1.0, 0.55, 0.4))


def _nuisance_world(c: ml_collections.ConfigDict) -> None:
  """tight where within-identity variation is learnable, so the loss's pull matters.

  In tight an untrained readout already keeps identity (identity is a smooth, nearly linear
  function of the image), and margins moved the worst group by about half a point. Here
  every image adds a 16-d nuisance code (std 0.5) in its own render directions, mixed per
  group like the identity's (the minority's mostly its own): a random projection of the
  pixels drops the minority from 78 to 62 % (majority 79 -> 77), and the model must learn
  to discard it from the minority's 4 % of the images. Chosen on seed 100 (the study runs
  seeds 0-4), the one setting probed: CosFace 96.0 / 87.6 / 71.8 per group, minority margin
  +0.15 / +0.3 moved the worst group by +1.2, -0.15 / -0.3 by -2.0. The study's world: on
  seeds 0-4 minority margins 0 / -0.35 lower the worst group by 2.1-5.7 points (the gate
  passes), minority +0.15 / +0.3 moves it by -0.8…+1.2 (README, MvCoM study).
  """
  _tight_world(c)
  c.data.update(nuisance_dim=16, nuisance_scale=0.5)
