"""IResNet: shapes and parameter counts (eval_shape) and numerical parity with an
independent PyTorch IResNet built here from the arcface_torch description."""

import copy
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from face_jax.models import iresnet


class TorchBlock(tnn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.bn1 = tnn.BatchNorm2d(cin, eps=1e-5)
    self.conv1 = tnn.Conv2d(cin, cout, 3, 1, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(cout, eps=1e-5)
    self.prelu = tnn.PReLU(cout)
    self.conv2 = tnn.Conv2d(cout, cout, 3, stride, 1, bias=False)
    self.bn3 = tnn.BatchNorm2d(cout, eps=1e-5)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False),
                                       tnn.BatchNorm2d(cout, eps=1e-5))

  def forward(self, x):
    y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
    return y + (self.downsample(x) if self.downsample is not None else x)


class TorchIResNet(tnn.Module):
  def __init__(self, layers, widths=(64, 128, 256, 512), embed=512, spatial=7):
    super().__init__()
    self.conv1 = tnn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(widths[0], eps=1e-5)
    self.prelu = tnn.PReLU(widths[0])
    cin = widths[0]
    for s, (n, w) in enumerate(zip(layers, widths)):
      blocks = []
      for i in range(n):
        blocks.append(TorchBlock(cin, w, 2 if i == 0 else 1))
        cin = w
      setattr(self, f"layer{s + 1}", tnn.Sequential(*blocks))
    self.n_stages = len(layers)
    self.bn2 = tnn.BatchNorm2d(cin, eps=1e-5)
    self.fc = tnn.Linear(cin * spatial * spatial, embed)
    self.features = tnn.BatchNorm1d(embed, eps=1e-5)
    tnn.init.constant_(self.features.weight, 1.0)
    self.features.weight.requires_grad = False

  def forward(self, x):
    x = self.prelu(self.bn1(self.conv1(x)))
    for s in range(self.n_stages):
      x = getattr(self, f"layer{s + 1}")(x)
    return self.features(self.fc(torch.flatten(self.bn2(x), 1)))


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _n_params(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("arch", ["r18", "r50"])
def test_param_count_matches_torch_reference(arch):
  model = iresnet.iresnet(arch)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 112, 112, 3))))
  flax_count = _n_params(nn.meta.unbox(shapes["params"]))
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 112, 112, 3))), shapes)
  assert out.shape == (2, 512) and out.dtype == jnp.float32
  torch_model = TorchIResNet(iresnet.ARCHS[arch])
  torch_count = sum(p.numel() for p in torch_model.parameters())
  # torch also counts the frozen features.weight (512 ones), which Flax does not store.
  assert flax_count == torch_count - 512
  if arch == "r50":
    assert abs(flax_count - 43.6e6) < 0.1e6, flax_count
  print(f"{arch}: {flax_count:,} params")


def _to_flax(state_dict, spatial):
  """Converts the torch reference's state dict with the mapping in iresnet's docstring."""
  params, stats = {}, {}

  def put(tree, path, value):
    for p in path[:-1]:
      tree = tree.setdefault(p, {})
    tree[path[-1]] = jnp.asarray(value)

  for key, t in state_dict.items():
    v = t.detach().numpy()
    parts = key.split(".")
    leaf = parts[-1]
    mods, i = [], 0
    body = parts[:-1]
    while i < len(body):  # "layer1.0" -> "layer1_0", "downsample.1" -> "downsample_1"
      if i + 1 < len(body) and body[i + 1].isdigit():
        mods.append(f"{body[i]}_{body[i + 1]}")
        i += 2
      else:
        mods.append(body[i])
        i += 1
    if leaf == "num_batches_tracked":
      continue
    if mods == ["features"] and leaf == "weight":
      assert np.all(v == 1.0)
      continue
    if mods == ["fc"] and leaf == "weight":
      e, chw = v.shape
      c = chw // (spatial * spatial)
      put(params, mods + ["kernel"], v.reshape(e, c, spatial, spatial).transpose(2, 3, 1, 0).reshape(-1, e))
    elif v.ndim == 4:
      put(params, mods + ["kernel"], v.transpose(2, 3, 1, 0))
    elif "prelu" in mods[-1]:
      put(params, mods + ["alpha"], v)
    elif leaf == "running_mean":
      put(stats, mods + ["mean"], v)
    elif leaf == "running_var":
      put(stats, mods + ["var"], v)
    elif mods == ["fc"]:
      put(params, mods + ["bias"], v)
    else:
      put(params, mods + [{"weight": "scale", "bias": "bias"}[leaf]], v)
  return {"params": params, "batch_stats": stats}


def _stack_blocks(variables, layers):
  """Unrolled variables (layerS_<i>) -> the scan layout: layerS_<i>, i >= 1, stacked on a new
  leading axis as layerS_blocks (written here from the docstring, not by face_jax.convert)."""
  out = {}
  for collection, tree in variables.items():
    tree = dict(tree)
    for s, n in enumerate(layers, start=1):
      if n > 1:
        blocks = [tree.pop(f"layer{s}_{i}") for i in range(1, n)]
        tree[f"layer{s}_blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    out[collection] = tree
  return out


# Stage 2 scans 2 blocks, stage 4 one; stages 1 and 3 have nothing to scan.
SMALL = dict(layers=(1, 3, 1, 2), widths=(8, 16, 16, 32), embed_dim=24)


@pytest.fixture(scope="module")
def small_reference():
  torch.manual_seed(0)
  ref = TorchIResNet(SMALL["layers"], SMALL["widths"], embed=SMALL["embed_dim"], spatial=2).double()
  with torch.no_grad():  # non-trivial BN statistics and affine parameters
    for m in ref.modules():
      if isinstance(m, (tnn.BatchNorm2d, tnn.BatchNorm1d)):
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 1.5)
        if m.weight.requires_grad:
          m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
      if isinstance(m, tnn.PReLU):
        m.weight.uniform_(0.1, 0.4)
  x = np.random.default_rng(0).normal(size=(4, 3, 32, 32))
  state = copy.deepcopy(ref.state_dict())   # before the train-mode pass updates its statistics
  ref.eval()
  with torch.no_grad():
    want_eval = ref(torch.from_numpy(x)).numpy()
  ref.train()
  with torch.no_grad():
    want_train = ref(torch.from_numpy(x)).numpy()
  return ref, state, x, want_eval, want_train


@pytest.mark.parametrize("scan_layers", [False, True])
def test_small_variant_matches_torch_in_eval_and_train_mode(small_reference, scan_layers):
  ref, state, x, want_eval, want_train = small_reference
  variables = _to_flax(state, spatial=2)
  if scan_layers:
    variables = _stack_blocks(variables, SMALL["layers"])
  model = iresnet.IResNet(**SMALL, scan_layers=scan_layers)
  # Structure check: the converted tree has exactly the Flax module's variables.
  init_shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert jax.tree.structure(nn.meta.unbox(init_shapes)) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(nn.meta.unbox(init_shapes)), jax.tree.leaves(variables)):
    assert a.shape == b.shape
  assert ("layer2_blocks" in variables["params"]) == scan_layers
  x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32)
  got = model.apply(variables, x_nhwc, train=False)
  print(f"IResNet (scan {scan_layers}) vs torch, eval mode: max |diff| {np.max(np.abs(got - want_eval)):.2e}")
  np.testing.assert_allclose(got, want_eval, rtol=1e-5, atol=1e-5)
  got, mutated = model.apply(variables, x_nhwc, train=True, mutable=["batch_stats"])
  print(f"IResNet (scan {scan_layers}) vs torch, train mode: max |diff| {np.max(np.abs(got - want_train)):.2e}")
  np.testing.assert_allclose(got, want_train, rtol=1e-4, atol=1e-4)
  # Running means follow PyTorch momentum 0.1 (variances differ by the n/(n-1) factor),
  # inside the scanned stack too (block i of stage 2 is row i - 1 of its stack).
  stats = mutated["batch_stats"]
  np.testing.assert_allclose(stats["bn2"]["mean"], ref.bn2.running_mean.numpy(), rtol=1e-4, atol=1e-5)
  for i in (1, 2):
    got_mean = stats["layer2_blocks"]["bn3"]["mean"][i - 1] if scan_layers else stats[f"layer2_{i}"]["bn3"]["mean"]
    np.testing.assert_allclose(got_mean, ref.layer2[i].bn3.running_mean.numpy(), rtol=1e-4, atol=1e-5)


def test_scan_and_remat_give_the_unrolled_gradients_and_statistics():
  """Training-mode loss, gradients and BatchNorm updates agree across the three layouts."""
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  base = iresnet.IResNet(**SMALL)
  variables = nn.meta.unbox(jax.jit(base.init)(jax.random.key(0), x))
  results = {}
  for scan, remat in ((False, False), (True, False), (True, True)):
    model = iresnet.IResNet(**SMALL, scan_layers=scan, remat=remat)
    v = _stack_blocks(variables, SMALL["layers"]) if scan else variables

    def loss(params, model=model, stats=v["batch_stats"]):
      y, mutated = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                               mutable=["batch_stats"])
      return jnp.sum(jnp.sin(y)), mutated["batch_stats"]
    (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(v["params"])
    results[scan, remat] = value, (grads, stats)
  want_value, want = results[False, False]
  want = _stack_blocks({"params": want[0], "batch_stats": want[1]}, SMALL["layers"])
  for key in ((True, False), (True, True)):
    value, (grads, stats) = results[key]
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got_tree, want_tree in ((grads, want["params"]), (stats, want["batch_stats"])):
      assert jax.tree.structure(got_tree) == jax.tree.structure(want_tree)
      # Relative to the whole tree: some gradients are zero up to rounding (a BN shift
      # followed by another BN), and a per-element tolerance would compare only noise there.
      a, b = _flat(got_tree), _flat(want_tree)
      assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), (key, np.linalg.norm(a - b))
  assert jax.tree.structure(results[True, True][1][0]) != jax.tree.structure(results[False, False][1][0])


def test_logical_axes_and_errors():
  model = iresnet.IResNet(layers=(1,), widths=(4,), embed_dim=6)
  v = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  assert v["params"]["conv1"]["kernel"].names == (None, None, "conv_in", "conv_out")
  assert v["params"]["fc"]["kernel"].names == (None, "embed")
  assert "scale" not in v["params"]["features"]
  assert set(v["batch_stats"]["features"]) == {"mean", "var"}
  assert jnp.allclose(v["params"]["layer1_0"]["prelu"]["alpha"].value, 0.25)
  scanned = jax.jit(iresnet.IResNet(layers=(3,), widths=(4,), embed_dim=6, scan_layers=True).init)(
      jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  assert scanned["params"]["layer1_blocks"]["conv1"]["kernel"].names == (
      "layers", None, None, "conv_in", "conv_out")
  assert scanned["params"]["layer1_blocks"]["conv1"]["kernel"].value.shape == (2, 3, 3, 4, 4)
  with pytest.raises(ValueError, match="same length"):
    iresnet.IResNet(layers=(1, 1), widths=(4,)).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="every stage needs a block"):
    iresnet.IResNet(layers=(1, 0), widths=(4, 4)).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="unknown IResNet"):
    iresnet.iresnet("r51")
