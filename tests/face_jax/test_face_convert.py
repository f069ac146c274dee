"""arcface_torch IResNet .pth -> Flax: parity with a PyTorch IResNet, key checks, safe loading.

`TorchIResNet` follows the published layout (spec mvcom.md §4.4, arcface_torch
backbones/iresnet.py): module names and shapes are what its state dicts contain.
"""

import jax
import numpy as np
import pytest
import torch
from torch import nn as tnn

from face_jax import convert
from face_jax.models.iresnet import IResNet, iresnet


class TorchIBasicBlock(tnn.Module):
  """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, + shortcut."""

  def __init__(self, inplanes, planes, stride, downsample):
    super().__init__()
    self.bn1 = tnn.BatchNorm2d(inplanes, eps=1e-5)
    self.conv1 = tnn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(planes, eps=1e-5)
    self.prelu = tnn.PReLU(planes)
    self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn3 = tnn.BatchNorm2d(planes, eps=1e-5)
    self.downsample = downsample

  def forward(self, x):
    out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
    return out + (self.downsample(x) if self.downsample is not None else x)


class TorchIResNet(tnn.Module):
  """conv3x3 -> BN -> PReLU -> 4 stages (first block stride 2) -> BN2d -> flatten ->
  dropout -> Linear -> BatchNorm1d (scale frozen at 1)."""

  def __init__(self, layers, widths=(64, 128, 256, 512), embed_dim=512, feature_map=7):
    super().__init__()
    self.inplanes = widths[0]
    self.conv1 = tnn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(widths[0], eps=1e-5)
    self.prelu = tnn.PReLU(widths[0])
    for s, (blocks, planes) in enumerate(zip(layers, widths)):
      setattr(self, f"layer{s + 1}", self._make_layer(planes, blocks))
    self.bn2 = tnn.BatchNorm2d(widths[-1], eps=1e-5)
    self.dropout = tnn.Dropout(p=0.0)
    self.fc = tnn.Linear(widths[-1] * feature_map * feature_map, embed_dim)
    self.features = tnn.BatchNorm1d(embed_dim, eps=1e-5)
    tnn.init.constant_(self.features.weight, 1.0)
    self.features.weight.requires_grad = False
    self.num_stages = len(layers)

  def _make_layer(self, planes, blocks):
    downsample = tnn.Sequential(tnn.Conv2d(self.inplanes, planes, 1, 2, bias=False),
                                tnn.BatchNorm2d(planes, eps=1e-5))
    layers = [TorchIBasicBlock(self.inplanes, planes, 2, downsample)]
    self.inplanes = planes
    layers += [TorchIBasicBlock(planes, planes, 1, None) for _ in range(1, blocks)]
    return tnn.Sequential(*layers)

  def forward(self, x):
    x = self.prelu(self.bn1(self.conv1(x)))
    for s in range(self.num_stages):
      x = getattr(self, f"layer{s + 1}")(x)
    x = torch.flatten(self.bn2(x), 1)
    return self.features(self.fc(self.dropout(x)))


def randomize(model: tnn.Module, seed: int) -> None:
  """Random weights and BatchNorm statistics everywhere (frozen scale stays 1), scaled so
  activations stay O(1) through the network."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, module in model.named_modules():
      if isinstance(module, (tnn.Conv2d, tnn.Linear)):
        fan_in = module.weight[0].numel()
        module.weight.copy_(torch.randn(module.weight.shape, generator=g) / fan_in ** 0.5)
        if module.bias is not None:
          module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
      elif isinstance(module, (tnn.BatchNorm2d, tnn.BatchNorm1d)):
        c = module.num_features
        if name != "features":
          module.weight.copy_(0.5 + torch.rand(c, generator=g))
        module.bias.copy_(0.1 * torch.randn(c, generator=g))
        module.running_mean.copy_(0.1 * torch.randn(c, generator=g))
        module.running_var.copy_(0.5 + torch.rand(c, generator=g))
        module.num_batches_tracked.fill_(1234)
      elif isinstance(module, tnn.PReLU):
        module.weight.copy_(0.5 * torch.rand(module.weight.shape, generator=g))


def _parity(torch_model, flax_model, image_size, tmp_path, seed=0):
  randomize(torch_model, seed)
  torch_model.eval()
  path = tmp_path / "model.pt"
  torch.save(torch_model.state_dict(), path)
  variables = convert.load_iresnet_checkpoint(path, flax_model, image_size)
  x = np.random.default_rng(seed).uniform(-1, 1, (2, *image_size, 3)).astype(np.float32)
  with torch.no_grad():
    want = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  got = np.asarray(flax_model.apply(variables, x, train=False))
  return got, want


def test_r18_parity_at_112(tmp_path):
  got, want = _parity(TorchIResNet((2, 2, 2, 2)), iresnet("r18"), (112, 112), tmp_path)
  assert got.shape == want.shape == (2, 512)
  err = np.abs(got - want).max() / np.abs(want).max()
  print(f"r18 parity: max |flax - torch| / max |torch| = {err:.2e}, "
        f"max abs = {np.abs(got - want).max():.2e}, output scale {np.abs(want).max():.3g}")
  assert err < 1e-5


TINY = dict(layers=(1, 3), widths=(8, 16), embed_dim=8)   # stage 2: a scan over 2 blocks


def _tiny_state_dict(seed=0):
  model = TorchIResNet(TINY["layers"], TINY["widths"], TINY["embed_dim"], feature_map=3)
  randomize(model, seed)
  return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_tiny_parity_with_wrappers_and_odd_input(tmp_path, scan_layers):
  # 10x10 input: stages give 5x5 then 3x3 (ceil), so the head reordering is not square-by-luck.
  torch_model = TorchIResNet(TINY["layers"], TINY["widths"], TINY["embed_dim"], feature_map=3)
  model = IResNet(**TINY, scan_layers=scan_layers)
  got, want = _parity(torch_model, model, (10, 10), tmp_path, seed=1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  # DDP prefixes and the training-checkpoint wrapper are unwrapped.
  wrapped = {"state_dict_backbone": {f"module.{k}": v for k, v in
                                     torch_model.state_dict().items()}, "epoch": 3}
  torch.save(wrapped, tmp_path / "checkpoint_gpu_0.pt")
  variables = convert.load_iresnet_checkpoint(tmp_path / "checkpoint_gpu_0.pt", model, (10, 10))
  assert variables["batch_stats"]["features"]["var"].shape == (8,)
  if scan_layers:   # torch blocks layer2.1, layer2.2 are rows 0, 1 of the stack
    np.testing.assert_array_equal(variables["params"]["layer2_blocks"]["conv2"]["kernel"][1],
                                  torch_model.layer2[2].conv2.weight.detach().numpy().transpose(2, 3, 1, 0))
    assert "layer2_1" not in variables["params"]


@pytest.mark.parametrize("scan_layers", [False, True])
def test_written_checkpoint_loads_strictly_into_torch_and_round_trips(tmp_path, scan_layers):
  sd = _tiny_state_dict(seed=2)
  model = IResNet(**TINY, scan_layers=scan_layers)
  variables = convert.iresnet_variables(sd, model, (10, 10))
  back = convert.iresnet_state_dict(variables, model, (10, 10))
  assert set(back) == set(sd)
  for key, value in sd.items():
    if not key.endswith("num_batches_tracked"):   # Flax keeps no step counters: written as 0
      np.testing.assert_array_equal(back[key], value, err_msg=key)
  convert.save_iresnet_checkpoint(tmp_path / "out.pt", variables, model, (10, 10))
  torch_model = TorchIResNet(TINY["layers"], TINY["widths"], TINY["embed_dim"], feature_map=3)
  torch_model.load_state_dict(torch.load(tmp_path / "out.pt", weights_only=True), strict=True)
  torch_model.eval()
  x = np.random.default_rng(3).uniform(-1, 1, (2, 10, 10, 3)).astype(np.float32)
  with torch.no_grad():
    want = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  got = np.asarray(model.apply(variables, x, train=False))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_relayout_between_unrolled_and_scanned():
  sd = _tiny_state_dict(seed=4)
  unrolled, scanned = IResNet(**TINY), IResNet(**TINY, scan_layers=True)
  a = convert.iresnet_variables(sd, unrolled, (10, 10))
  b = convert.relayout(a, unrolled, scanned, (10, 10))
  want = convert.iresnet_variables(sd, scanned, (10, 10))
  assert jax.tree.structure(b) == jax.tree.structure(want) and "layer2_blocks" in b["params"]
  for x, y in zip(jax.tree.leaves(b), jax.tree.leaves(want)):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(convert.CheckpointError, match=r"missing \['batch_stats/layer2_blocks/bn1/mean'.*"
                     r"the other scan_layers layout: convert them with face_jax.convert.relayout"):
    convert.iresnet_state_dict(a, scanned, (10, 10))


def test_missing_unexpected_and_misshaped_keys_are_named():
  model = IResNet(**TINY)
  sd = _tiny_state_dict()
  del sd["layer2.1.bn2.running_var"]
  sd["layer2.1.conv2.weight"] = np.zeros((16, 16, 1, 3), np.float32)
  sd["head.extra"] = np.zeros((4,), np.float32)
  with pytest.raises(convert.CheckpointError) as e:
    convert.iresnet_variables(sd, model, (10, 10), source="my.pth")
  message = str(e.value)
  assert message.startswith("my.pth does not fit IResNet(layers=(1, 3), widths=(8, 16)")
  assert ("missing key 'layer2.1.bn2.running_var': the model expects shape (16,) "
          "(Flax batch_stats/layer2_1/bn2/var (16,))") in message
  assert ("key 'layer2.1.conv2.weight' has shape (16, 16, 1, 3) in the checkpoint, the model "
          "expects (16, 16, 3, 3) (Flax params/layer2_1/conv2/kernel (3, 3, 16, 16))") in message
  assert "unexpected key 'head.extra' with shape (4,)" in message
  # The scanned model names the row of its stack.
  with pytest.raises(convert.CheckpointError) as e:
    convert.iresnet_variables(sd, IResNet(**TINY, scan_layers=True), (10, 10), source="my.pth")
  assert ("missing key 'layer2.1.bn2.running_var': the model expects shape (16,) "
          "(Flax batch_stats/layer2_blocks/bn2/var[0] of (2, 16))") in str(e.value)
  assert ("key 'layer2.1.conv2.weight' has shape (16, 16, 1, 3) in the checkpoint, the model "
          "expects (16, 16, 3, 3) (Flax params/layer2_blocks/conv2/kernel[0] of (2, 3, 3, 16, 16))"
          ) in str(e.value)
  # A checkpoint for another input size: the head's Linear does not fit.
  with pytest.raises(convert.CheckpointError, match=r"key 'fc.weight' has shape \(8, 144\) in "
                     r"the checkpoint, the model expects \(8, 256\)"):
    convert.iresnet_variables(_tiny_state_dict(), model, (16, 16))


def test_frozen_embedding_scale_must_be_one():
  sd = _tiny_state_dict()
  sd["features.weight"] = sd["features.weight"] * 2
  with pytest.raises(convert.CheckpointError, match=r"'features.weight' must be all ones"):
    convert.iresnet_variables(sd, IResNet(**TINY), (10, 10))


class _Boom:
  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    import os  # pylint: disable=import-outside-toplevel
    return (os.system, (f"touch {self.target}",))


def test_pickled_code_in_a_checkpoint_is_refused_not_run(tmp_path):
  marker = tmp_path / "pwned"
  torch.save({"conv1.weight": torch.zeros(1), "evil": _Boom(marker)}, tmp_path / "evil.pth")
  with pytest.raises(convert.CheckpointError, match=r"evil\.pth: not a weights-only PyTorch "
                     r"checkpoint"):
    convert.read_state_dict(tmp_path / "evil.pth")
  assert not marker.exists()
  torch.save({"note": "text"}, tmp_path / "odd.pth")
  with pytest.raises(convert.CheckpointError, match=r"odd\.pth: entry 'note' is a str"):
    convert.read_state_dict(tmp_path / "odd.pth")
