"""IResNet backbones as in insightface `recognition/arcface_torch/backbones/iresnet.py`.

Input NHWC float images (arcface_torch normalises RGB as (x/255 - 0.5)/0.5), output a
(batch, embed_dim) float32 embedding. Depths (IBasicBlocks per stage): r18 (2,2,2,2),
r34 (3,4,6,3), r50 (3,4,14,3), r100 (3,13,30,3), r200 (6,26,60,6); widths 64/128/256/512.

  stem   conv3x3 s1 (no bias) -> BN -> PReLU
  stage  first block has stride 2 (on its second conv) and a 1x1-conv+BN shortcut
  block  BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, + shortcut; no activation after
  head   BN2d -> flatten -> dropout -> Linear -> BN1d with its scale frozen at 1 (`use_scale=False`)

BatchNorm: eps 1e-5, Flax momentum 0.9 (= PyTorch momentum 0.1). Running statistics live in
the `batch_stats` collection. (PyTorch updates running_var with the unbiased batch variance,
Flax with the biased one; the normalisation itself is identical.) Init as arcface_torch:
conv N(0, 0.1), BN scale 1 / bias 0, PReLU 0.25, Linear U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

A width/depth-reduced variant for CPU runs is the same module with other `layers`, `widths`,
`embed_dim` and input size (the head's Linear infers its input size from the feature map).

`scan_layers`: a stage's blocks after its first (all of one shape: stride 1, no shortcut
conv) run as one `nn.scan` over a stacked copy of their variables, so XLA compiles one
block per stage instead of one per block (r100: 4 instead of 49 bodies per pass, and the
MvCoM step has several passes). Their variables then live under `layerS_blocks` with a
leading (blocks - 1) axis; the first block stays `layerS_0`. With `remat` the scanned
body is rematerialised, so the backward pass keeps one input per block.

Parameter naming (for converting an arcface_torch `.pth`; `<i>` is the block index in a stage):

  torch key                          Flax path (collection 'params' unless noted)
  conv1.weight (O,I,kh,kw)           conv1/kernel (kh,kw,I,O)
  bn1.{weight,bias}                  bn1/{scale,bias}
  bn1.{running_mean,running_var}     batch_stats: bn1/{mean,var}
  prelu.weight (C,)                  prelu/alpha (C,)
  layerS.<i>.conv1.weight            layerS_<i>/conv1/kernel          (S = 1..4)
  layerS.<i>.{bn1,bn2,bn3}.*         layerS_<i>/{bn1,bn2,bn3}/*        (as bn1 above)
  layerS.<i>.prelu.weight            layerS_<i>/prelu/alpha
  layerS.<i>.conv2.weight            layerS_<i>/conv2/kernel
  layerS.0.downsample.0.weight       layerS_0/downsample_0/kernel      (1x1 conv)
  layerS.0.downsample.1.*            layerS_0/downsample_1/*           (BN)
  layerS.<i>.* for i >= 1, scan_layers   layerS_blocks/*[i - 1]          (stacked on axis 0)
  bn2.*                              bn2/*
  fc.weight (E, C*H*W)               fc/kernel (H*W*C, E): torch flattens NCHW as (C,H,W), Flax
                                     NHWC as (H,W,C), so kernel = w.reshape(E,C,H,W)
                                     .transpose(2,3,1,0).reshape(H*W*C, E)
  fc.bias                            fc/bias
  features.weight                    (none: frozen at 1 in torch; a converter should check it is 1)
  features.bias                      features/bias
  features.{running_mean,running_var}  batch_stats: features/{mean,var}
  *.num_batches_tracked              (none)
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ARCHS = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}
BN_MOMENTUM = 0.9   # Flax convention: running = 0.9 * running + 0.1 * batch (PyTorch momentum 0.1)
BN_EPS = 1e-5
CONV_INIT_STD = 0.1
PRELU_INIT = 0.25


def _torch_linear_bias_init(fan_in: int):
  """PyTorch nn.Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / fan_in ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class PReLU(nn.Module):
  """Per-channel PReLU on the last axis: x if x > 0 else alpha * x."""
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    alpha = self.param("alpha", nn.with_logical_partitioning(
        nn.initializers.constant(PRELU_INIT), ("norm",)), (x.shape[-1],), self.param_dtype)
    return jnp.where(x > 0, x, alpha.astype(x.dtype) * x)


def _conv(features: int, kernel: int, strides: int, dtype, name: str) -> nn.Conv:
  # Explicit symmetric padding reproduces torch's padding=k//2 also for stride 2
  # (Flax 'SAME' would pad asymmetrically).
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                 kernel_init=nn.with_logical_partitioning(
                     nn.initializers.normal(CONV_INIT_STD), (None, None, "conv_in", "conv_out")),
                 name=name)


def _batch_norm(train: bool, dtype, name: str, use_scale: bool = True) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS,
                      dtype=dtype, use_scale=use_scale,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                      name=name)


class IBasicBlock(nn.Module):
  """BN-conv-BN-PReLU-conv-BN residual block; (b, h, w, c) -> (b, h/s, w/s, features)."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    bn = functools.partial(_batch_norm, train, self.dtype)
    y = bn("bn1")(x)
    y = _conv(self.features, 3, 1, self.dtype, "conv1")(y)
    y = bn("bn2")(y)
    y = PReLU(name="prelu")(y)
    y = _conv(self.features, 3, self.strides, self.dtype, "conv2")(y)
    y = bn("bn3")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.strides, self.dtype, "downsample_0")(x)
      x = bn("downsample_1")(x)
    return y + x


class ScannedBlock(IBasicBlock):
  """IBasicBlock in `nn.scan`'s (carry, x) -> (carry, y) form; the activations are the carry."""

  def __call__(self, x, train: bool):  # pylint: disable=arguments-differ
    return super().__call__(x, train), None


def scanned_blocks(count: int, remat: bool, name: str, **block_kwargs) -> nn.Module:
  """`count` identical stride-1 IBasicBlocks as one scan: (b, h, w, c) -> ((b, h, w, c), None).

  Every variable collection gets a leading `count` axis, logical name `layers` (the axis
  rules replicate it: each device holds every block, as without the scan).
  """
  body = (nn.remat(ScannedBlock, static_argnums=(2,), prevent_cse=False) if remat
          else ScannedBlock)
  stack = nn.scan(body, variable_axes={"params": 0, "batch_stats": 0},
                  split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,),
                  length=count, metadata_params={nn.PARTITION_NAME: "layers"})
  return stack(strides=1, name=name, **block_kwargs)


class IResNet(nn.Module):
  """IResNet: (b, h, w, c) images -> (b, embed_dim) float32 embeddings.

  Attributes:
    layers: IBasicBlocks per stage, e.g. ARCHS["r50"].
    widths: channels per stage; the stem has widths[0] channels (arcface_torch: 64).
    embed_dim: embedding size (arcface_torch `num_features`, 512).
    dropout: dropout rate before the embedding Linear (arcface_torch default 0).
    dtype: compute dtype of the convolutional trunk; the head runs in float32.
    remat: recompute each block in the backward pass (arcface_torch `using_checkpoint`).
    scan_layers: run each stage's blocks after the first as one `nn.scan` (see above).
  """
  layers: Sequence[int]
  widths: Sequence[int] = (64, 128, 256, 512)
  embed_dim: int = 512
  dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  scan_layers: bool = False

  @nn.compact
  def __call__(self, images, train: bool = False):
    if len(self.layers) != len(self.widths):
      raise ValueError(f"IResNet: layers {tuple(self.layers)} and widths {tuple(self.widths)} "
                       "must have the same length (one entry per stage)")
    if min(self.layers) < 1:
      raise ValueError(f"IResNet: layers {tuple(self.layers)}: every stage needs a block")
    x = images.astype(self.dtype)
    x = _conv(self.widths[0], 3, 1, self.dtype, "conv1")(x)
    x = _batch_norm(train, self.dtype, "bn1")(x)
    x = PReLU(name="prelu")(x)
    block_cls = nn.remat(IBasicBlock, static_argnums=(2,)) if self.remat else IBasicBlock
    for stage, (blocks, width) in enumerate(zip(self.layers, self.widths)):
      x = block_cls(width, strides=2, dtype=self.dtype, name=f"layer{stage + 1}_0")(x, train)
      if self.scan_layers and blocks > 1:
        x, _ = scanned_blocks(blocks - 1, self.remat, f"layer{stage + 1}_blocks", features=width,
                              dtype=self.dtype)(x, train)
        continue
      for i in range(1, blocks):
        x = block_cls(width, strides=1, dtype=self.dtype, name=f"layer{stage + 1}_{i}")(x, train)
    x = _batch_norm(train, self.dtype, "bn2")(x)
    # Head in float32 (float64 if the trunk is), as arcface_torch runs the fc outside
    # fp16 autocast.
    head_dtype = jnp.promote_types(self.dtype, jnp.float32)
    x = x.astype(head_dtype).reshape(x.shape[0], -1)   # (b, h*w*c), NHWC order
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    fan_in = x.shape[-1]
    x = nn.Dense(self.embed_dim, dtype=head_dtype,
                 kernel_init=nn.with_logical_partitioning(
                     nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
                     (None, "embed")),
                 bias_init=nn.with_logical_partitioning(_torch_linear_bias_init(fan_in), ("embed",)),
                 name="fc")(x)
    return _batch_norm(train, head_dtype, "features", use_scale=False)(x)


def iresnet(arch: str, **kwargs) -> IResNet:
  """IResNet by insightface name ('r18', 'r34', 'r50', 'r100', 'r200')."""
  if arch not in ARCHS:
    raise ValueError(f"unknown IResNet arch {arch!r}; choose one of {sorted(ARCHS)}")
  return IResNet(layers=ARCHS[arch], **kwargs)
