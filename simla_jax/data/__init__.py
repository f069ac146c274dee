"""SIMLA input: datasets, tokenizer, augmentation, masks, MIM targets, grain pipelines.

Modules (import them directly; this package imports nothing heavy):
  shapes       ShapesSource(data_cfg, split): procedural image-caption world, no files.
  captions     CaptionJsonSource(files, image_root): ALBEF-style caption JSON + images.
  tfds_builders  TFDS array_record builds of every SIMLA format; TfdsCaptionSource.
  build        `python -m simla_jax.data.build`: the command that builds them.
  tokenizer    Tokenizer (WordPiece, `tokenizers`), pre_caption (official normalisation).
  augment      train / eval / dVAE-view image transforms (PIL), left/right caption swap.
  masks        mlm_mask (JAX, in the train step), BlockMaskGenerator (BEiT, numpy).
  mim_targets  MIM target tokens: frozen random projection (default) or DALL-E dVAE.
  dvae         DALL-E dVAE encoder in Flax + converters from PyTorch weights.
  pipeline     make_train_iterator / make_eval_data: grain pipelines producing batches.

Train batch (dict of numpy arrays, process-local batch B, from `pipeline.make_train_iterator`):
  image       (B, H, W, 3) float32, CLIP-normalised
  text_ids    (B, L) int32, `[CLS] w1 .. wn [PAD]..` (no [SEP] by default), L = max_len
  text_mask   (B, L) int32, 1 on tokens, 0 on padding
  patch_mask  (B, N) bool, BEiT block mask on the (H/p, W/p) patch grid, row-major
  dvae_image  (B, H_d, W_d, 3) float32 in [0.1, 0.9] (`map_pixels`), only if mim.target == "dvae"
  index       (B,) int32 source index of each example

`default_data_config()` returns `config.data` with every key; a run config nests it
(`config.data = default_data_config()`) and overrides fields.
"""

import ml_collections

# Official CLIP normalisation statistics (RGB), used by SIMLA's transforms.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RANDAUG_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
               "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def default_data_config() -> ml_collections.ConfigDict:
  """Every `config.data` key with its default: the CPU-sized shapes-world run."""
  c = ml_collections.ConfigDict()
  c.name = "shapes"               # shapes | captions
  # Where examples come from: "direct" renders / parses the inputs at run time; "tfds"
  # reads a build (python -m simla_jax.data.build) of the same dataset by index.
  c.source = "direct"             # direct | tfds
  c.tfds_dir = ""                 # the build's --out
  c.tfds_name = ""                # "<builder>/<config>[:version]", e.g. simla_captions/coco
  c.image_size = 64               # square model input, pixels
  c.seed = 0                      # shuffle / augmentation / mask randomness
  c.max_len = 30                  # text length L incl. [CLS] (official retrieval: 30)
  c.eval_split = "test"           # split `make_eval_data` reads by default

  c.shapes = ml_collections.ConfigDict(dict(
      seed=0,                     # which world: image i of split s = f(seed, s, i)
      num_objects=(1, 4),         # inclusive range per image
      captions_per_image=5,
      max_caption_words=29,       # [CLS] + 29 words = max_len
      train_size=100_000, val_size=500, test_size=500, comp_size=500, strict_size=500,
      # (colour, shape) pairs absent from train/val/test; each `comp` image has one,
      # every object of a `strict` image is one.
      holdout_pairs=("red triangle", "blue star", "green hexagon", "yellow cross"),
      grid=3,                     # objects sit in distinct cells of a grid x grid layout
      small_radius=0.26,          # object radius as a fraction of the cell size
      large_radius=0.44,
      colour_jitter=12,           # +- per channel, uint8 units
      background_range=(55, 105), # grey level of the background
      texture_amplitude=10.0,     # uint8 units
      noise_std=4.0,              # Gaussian pixel noise, uint8 units
  ))

  c.captions = ml_collections.ConfigDict(dict(
      train_files=(),             # ALBEF JSON lists [{"image": path, "caption": str|[str]}]
      eval_files=(),
      image_root="",              # joined before each record's "image" path
      skip_bad=False,             # True: skip undecodable / missing images and count them
      max_bad_fraction=0.01,      # skip_bad: stop when bad > this * max(read, per epoch)
  ))

  c.tokenizer = ml_collections.ConfigDict(dict(
      vocab_file="",              # "" = vocabulary built from the shapes world
      lowercase=True,
      add_sep=False,              # official captions are "[CLS] w1 .. wn" without [SEP]
      max_words=30,               # pre_caption word cap
  ))

  c.aug = ml_collections.ConfigDict(dict(
      train=True,                 # False: eval transform (resize + normalise) for training too
      crop_scale=(0.8, 1.0),      # RandomResizedCrop area range (official 256 px: (0.2, 1.0))
      crop_ratio=(3 / 4, 4 / 3),
      flip=True,
      flip_swap=(("left", "right"),),  # caption words swapped when the image is flipped
      randaug_n=2,                # ops drawn (with replacement) per image
      randaug_m=7,                # magnitude, out of 10
      randaug_prob=0.5,           # each drawn op is applied with this probability
      randaug_ops=RANDAUG_OPS,
      translate_const=3.0,        # TranslateX/Y pixels at magnitude 10 (official 256 px: 10)
      fill=(128, 128, 128),       # fill of shear / translate / rotate
      mean=CLIP_MEAN,
      std=CLIP_STD,
  ))

  c.mlm = ml_collections.ConfigDict(dict(
      probability=0.15,           # Bernoulli per token, never [PAD] / [CLS]
      mask_frac=0.8,              # of selected tokens -> [MASK]
      random_frac=0.5,            # of the rest -> uniform random id (i.e. 10 %)
  ))

  c.mim = ml_collections.ConfigDict(dict(
      patch_size=16,              # ViT patch: mask grid = image_size / patch_size
      num_masking_patches=5,      # BEiT target count (official: 75 of 16x16)
      min_num_patches=2,          # smallest block (official: 16)
      max_num_patches=-1,         # largest block; -1 = num_masking_patches
      min_aspect=0.3,             # block aspect in [min_aspect, max_aspect]
      max_aspect=-1.0,            # -1 = 1 / min_aspect
      target="random_projection", # random_projection | dvae
      # random_projection: frozen projection of per-patch-normalised pixels to a codebook.
      codebook_size=512,
      projection_dim=16,
      projection_seed=0,
      norm_eps=1e-2,              # added to the per-patch variance
      # dvae: the DALL-E encoder on a separate half-resolution view.
      dvae_image_size=32,         # official: image_res // 2
      dvae_weights="",            # state dict (.pt / .pth / .npz) or the official encoder.pkl
      dvae_n_hid=256, dvae_n_blk_per_group=2, dvae_group_count=4, dvae_vocab_size=8192,
      map_pixels_eps=0.1,         # x * (1 - 2 eps) + eps
  ))

  c.loader = ml_collections.ConfigDict(dict(
      worker_count=0,             # grain multiprocessing workers (0 = in-process)
      worker_buffer_size=2,
      num_threads=0,              # grain ReadOptions threads (0 = read in the main thread)
      prefetch_buffer_size=0,
      num_epochs=-1,              # -1 = repeat forever
      drop_remainder=True,
      shard_by_process=True,      # split the source over jax processes
  ))
  return c
