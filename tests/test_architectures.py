"""Real architectures through convert, mask_convolutions and compact, built here without
torchvision: ResNet basic and bottleneck blocks (with and without downsample), MobileNetV2
inverted residuals (expansion, depthwise, ReLU6, linear bottleneck), DenseNet / Inception
concatenations, squeeze-and-excitation, and small whole models made of them.

Every check runs in float64: the masked model as PyTorch runs it (eager, masks multiply), the
mask_convolutions copy and the compacted model (BatchNorms folded or not) give the same outputs
to 1e-10, and compaction removes exactly the masked channels from every layer that reads them.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyprune
from benchmarks.models import (BasicBlock, Bottleneck, InvertedResidual, MobileNetV2, ResNet,
                               block_masks, prune_blocks, randomize_batchnorms)
from pyprune.nn import CAS, KWTA, SAP, ChannelGate, ChipMask, GaussianNoise, MagnitudePruned
from pyprune.nn import MaskedConv2d, NoisyWeight

TOL = dict(atol=1e-10, rtol=1e-10)


def _masks(model: nn.Module, names, seed: int = 0, share: dict | None = None) -> nn.Module:
    """model with a hard ChipMask after each BatchNorm named in names (random, about half kept,
    at least one kept and one removed); share maps a BatchNorm to another whose mask it copies."""
    share = share or {}
    names = set(names) | set(share)
    model, _ = pyprune.convert(model, chip_masks=lambda name, bn: name in names)
    gen = torch.Generator().manual_seed(seed)
    for name in sorted(names - set(share)):
        chip = model.get_submodule(name)[1]
        keep = torch.rand(chip.num_channels, generator=gen) < 0.5
        keep[0], keep[-1] = True, False
        chip.hard_mask = keep
    for name, source in share.items():
        model.get_submodule(name)[1].hard_mask = model.get_submodule(source)[1].hard_mask.clone()
    return model


def _kept(model: nn.Module, bn: str) -> int:
    return int(model.get_submodule(bn)[1].hard_mask.sum())


def _check(model: nn.Module, x: torch.Tensor, **kwargs) -> tuple[nn.Module, nn.Module]:
    """masked eager == mask_convolutions == compact (folded and not); returns (masked, small)."""
    model = randomize_batchnorms(model.double(), seed=1).eval()
    x = x.double()
    with torch.no_grad():
        ref = model(x)
        masked = pyprune.mask_convolutions(model, x, **kwargs).eval()
        torch.testing.assert_close(masked(x), ref, **TOL)
        plain = pyprune.compact(model, x, fold_batchnorm=False, channels_last=False, **kwargs)
        torch.testing.assert_close(plain(x), ref, **TOL)
        small = pyprune.compact(model, x, **kwargs)
        torch.testing.assert_close(small(x), ref, **TOL)
    assert small.compact_report.before == pyprune.count(model, x)
    assert small.compact_report.after == pyprune.count(small, x)
    assert plain.compact_report.after.flops == small.compact_report.after.flops
    return masked, plain


def _conv_params(cin: int, cout: int, k: int, groups: int = 1, bias: bool = False) -> int:
    return cout * cin // groups * k * k + (cout if bias else 0)


# ---------------------------------------------------------------- ResNet


@pytest.mark.parametrize("stride, cin, width", [(1, 8, 8), (2, 8, 12)],
                         ids=["identity", "downsample"])
def test_basic_block(stride, cin, width):
    torch.manual_seed(0)
    block = _masks(BasicBlock(cin, width, stride), ["bn1"])
    masked, small = _check(block, torch.randn(2, cin, 9, 9))
    kept = _kept(block, "bn1")
    assert small.conv1.out_channels == kept and small.conv2.in_channels == kept
    assert small.get_submodule("bn1.0").num_features == kept
    assert small.conv2.out_channels == width  # the residual stream stays
    assert masked.conv1.out_mask.sum() == kept and masked.conv2.in_mask.sum() == kept
    params = (_conv_params(cin, kept, 3) + 2 * kept + _conv_params(kept, width, 3) + 2 * width
              + (_conv_params(cin, width, 1) + 2 * width if stride != 1 or cin != width else 0))
    assert small.compact_report.after.params == params


def test_bottleneck_block():
    torch.manual_seed(1)
    block = _masks(Bottleneck(16, 8, stride=2), ["bn1", "bn2"])
    masked, small = _check(block, torch.randn(2, 16, 10, 10))
    k1, k2 = _kept(block, "bn1"), _kept(block, "bn2")
    assert (small.conv1.out_channels, small.conv2.in_channels) == (k1, k1)
    assert (small.conv2.out_channels, small.conv3.in_channels) == (k2, k2)
    assert small.conv3.out_channels == 32 and small.get_submodule("downsample.0").out_channels == 32
    params = (_conv_params(16, k1, 1) + _conv_params(k1, k2, 3) + _conv_params(k2, 32, 1)
              + _conv_params(16, 32, 1) + 2 * (k1 + k2 + 32 + 32))
    assert small.compact_report.after.params == params
    flops = 2 * (16 * k1 * 100 + k1 * k2 * 9 * 25 + k2 * 32 * 25 + 16 * 32 * 25)
    assert small.compact_report.after.flops == flops
    assert pyprune.count(masked, torch.randn(1, 16, 10, 10).double()).flops == flops


def test_residual_channels_union():
    """A channel of the residual stream leaves only when every branch adding into it masks it."""
    torch.manual_seed(2)
    model = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
    model = _masks(model, ["0.bn2", "1.bn2"], seed=3)
    masked, small = _check(model, torch.randn(2, 8, 6, 6))
    # the input is frozen (it is the model's), so the stream keeps every channel
    assert small.get_submodule("1.conv2").out_channels == 8


# ---------------------------------------------------------------- MobileNetV2


@pytest.mark.parametrize("stride, cin, cout", [(1, 8, 8), (2, 8, 12)], ids=["residual", "stride2"])
def test_inverted_residual(stride, cin, cout):
    torch.manual_seed(3)
    block = InvertedResidual(cin, cout, stride, expand_ratio=4)
    assert block.use_res_connect == (stride == 1 and cin == cout)
    assert isinstance(block.conv[0][2], nn.ReLU6) and block.conv[1][0].groups == 4 * cin
    model = _masks(block, ["conv.0.1"], share={"conv.1.1": "conv.0.1"})
    masked, small = _check(model, torch.randn(2, cin, 9, 9))
    kept = _kept(model, "conv.0.1")
    expand, dw, project = (small.get_submodule(n) for n in ("conv.0.0", "conv.1.0", "conv.2"))
    assert expand.out_channels == kept
    assert dw.in_channels == dw.out_channels == dw.groups == kept
    assert project.in_channels == kept and project.out_channels == cout
    params = (_conv_params(cin, kept, 1) + _conv_params(kept, kept, 3, groups=kept)
              + _conv_params(kept, cout, 1) + 2 * (2 * kept + cout))
    assert small.compact_report.after.params == params
    # mask_convolutions: the expansion skips its masked outputs, the projection its inputs; the
    # depthwise convolution stays dense
    assert masked.conv[0][0].out_mask.sum() == kept and masked.conv[2].in_mask.sum() == kept
    assert type(masked.conv[1][0]) is nn.Conv2d


def test_inverted_residual_mask_before_depthwise_only():
    """A mask after the expansion alone zeroes channels that the depthwise conv's BatchNorm
    makes constant again: they feed the projection, so compaction keeps them (exactly)."""
    torch.manual_seed(4)
    model = _masks(InvertedResidual(8, 8, 1, 4), ["conv.0.1"])
    _, small = _check(model, torch.randn(2, 8, 7, 7))
    assert small.get_submodule("conv.1.0").out_channels == 32
    assert small.get_submodule("conv.2").in_channels == 32


# ---------------------------------------------------------------- concatenation


class DenseBlock(nn.Module):
    """Dense connectivity, post-activation (as Inception's branches): layer i reads the
    concatenation of the block's input and every earlier layer's output and adds `growth`
    channels (conv - BN - ReLU); the block returns the concatenation of all of them."""

    def __init__(self, cin: int, growth: int, layers: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(cin + i * growth, growth, 3, 1, 1, bias=False)
                                   for i in range(layers))
        self.bns = nn.ModuleList(nn.BatchNorm2d(growth) for _ in range(layers))
        self.relu = nn.ReLU()

    def forward(self, x):
        features = [x]
        for conv, bn in zip(self.convs, self.bns):
            features.append(self.relu(bn(conv(torch.cat(features, 1)))))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self, cin: int = 3, stem: int = 8, growth: int = 6, layers: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, stem, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        self.block = DenseBlock(stem, growth, layers)
        self.transition = nn.Conv2d(stem + layers * growth, 10, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(10, 4)

    def forward(self, x):
        x = self.block(self.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(self.pool(self.transition(x)), 1))


def test_dense_block_concatenation():
    """A channel removed from a concatenated tensor leaves the input of every conv that reads a
    concatenation holding it, at its offset there."""
    torch.manual_seed(5)
    names = ["bn"] + [f"block.bns.{i}" for i in range(3)]
    model = _masks(DenseNet(), names, seed=5)
    _check(model, torch.randn(2, 3, 8, 8))
    small = pyprune.compact(model.double(), torch.randn(1, 3, 8, 8).double())
    kept = [_kept(model, n) for n in names]
    for i in range(3):
        conv = small.get_submodule(f"block.convs.{i}")
        assert conv.in_channels == sum(kept[:i + 1]) and conv.out_channels == kept[i + 1]
    assert small.transition.in_channels == sum(kept)


def test_dense_block_concatenation_weights():
    """Unfolded compaction keeps exactly the weight rows and columns of the kept channels."""
    torch.manual_seed(6)
    names = ["bn"] + [f"block.bns.{i}" for i in range(3)]
    model = _masks(DenseNet(), names, seed=6).double().eval()
    small = pyprune.compact(model, torch.randn(1, 3, 8, 8).double(), fold_batchnorm=False,
                            channels_last=False)
    masks = [model.get_submodule(n)[1].hard_mask for n in names]
    for i in range(3):
        columns = torch.cat(masks[:i + 1]).nonzero().view(-1)
        rows = masks[i + 1].nonzero().view(-1)
        expected = model.block.convs[i].weight.detach()[rows][:, columns]
        assert torch.equal(small.get_submodule(f"block.convs.{i}").weight.detach(), expected)
    columns = torch.cat(masks).nonzero().view(-1)
    assert torch.equal(small.transition.weight.detach(),
                       model.transition.weight.detach()[:, columns])


class Inception(nn.Module):
    """Parallel branches concatenated (one a MaskedConv2d with a static output mask), then a 1x1
    convolution; the same tensor also enters a second concatenation."""

    def __init__(self, cin: int = 6) -> None:
        super().__init__()
        self.b1 = MaskedConv2d(cin, 4, 1)
        self.b1.out_mask = torch.tensor([True, False, True, False])
        self.b3 = nn.Sequential(nn.Conv2d(cin, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5))
        self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(cin, 3, 1, bias=False),
                                  nn.BatchNorm2d(3))
        self.mix = nn.Conv2d(12, 7, 1)
        self.again = nn.Conv2d(9, 2, 1)

    def forward(self, x):
        a, b, c = F.relu(self.b1(x)), F.relu(self.b3(x)), F.relu(self.pool(x))
        return self.mix(torch.cat([a, b, c], dim=1)) + self.again(torch.cat((a, b), 1)).sum(
            1, keepdim=True)


def test_inception_concatenation():
    torch.manual_seed(7)
    model = _masks(Inception(), ["b3.1", "pool.2"], seed=7)
    masked, small = _check(model, torch.randn(2, 6, 5, 5))
    k3, kp = _kept(model, "b3.1"), _kept(model, "pool.2")
    assert small.b1.out_channels == 2 and small.get_submodule("b3.0").out_channels == k3
    assert small.mix.in_channels == 2 + k3 + kp and small.again.in_channels == 2 + k3
    assert masked.mix.in_mask.sum() == 2 + k3 + kp


def test_concatenation_along_other_dims_keeps_channels():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return self.head(torch.cat([y, y], dim=2))

    model = _masks(Model(), ["bn"], seed=8)
    _, small = _check(model, torch.randn(2, 3, 4, 4))
    assert small.conv.out_channels == 4 and small.head.in_channels == 4


# ---------------------------------------------------------------- squeeze-and-excitation


class SqueezeExcite(nn.Module):
    """x * sigmoid(expand(relu(reduce(mean_hw(x))))), with 1x1 convolutions or Linears."""

    def __init__(self, channels: int, reduced: int, linear: bool = False) -> None:
        super().__init__()
        self.linear = linear
        layer = nn.Linear if linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.reduce, self.expand = layer(channels, reduced), layer(reduced, channels)

    def forward(self, x):
        if self.linear:
            b, c = x.shape[0], x.shape[1]
            s = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
            s = torch.sigmoid(self.expand(F.relu(self.reduce(s)))).view(b, c, 1, 1)
        else:
            s = x.mean((2, 3), keepdim=True)
            s = torch.sigmoid(self.expand(F.relu(self.reduce(s))))
        return x * s


class SEBlock(nn.Module):
    """MobileNetV3-style: expansion, depthwise, SE on the expanded channels, projection."""

    def __init__(self, cin: int = 6, hidden: int = 12, linear: bool = False) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                    nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False),
                                nn.BatchNorm2d(hidden), nn.Hardswish())
        self.se = SqueezeExcite(hidden, 4, linear)
        self.project = nn.Sequential(nn.Conv2d(hidden, cin, 1, bias=False), nn.BatchNorm2d(cin))

    def forward(self, x):
        return x + self.project(self.se(self.dw(self.expand(x))))


@pytest.mark.parametrize("linear", [False, True], ids=["conv", "linear"])
def test_squeeze_excitation(linear):
    torch.manual_seed(9)
    model = _masks(SEBlock(linear=linear), ["expand.1"], share={"dw.1": "expand.1"}, seed=9)
    masked, small = _check(model, torch.randn(2, 6, 7, 7))
    kept = _kept(model, "expand.1")
    reduce, expand = small.get_submodule("se.reduce"), small.get_submodule("se.expand")
    if linear:
        assert (reduce.in_features, reduce.out_features) == (kept, 4)
        assert expand.out_features == kept
    else:
        assert (reduce.in_channels, reduce.out_channels) == (kept, 4)
        assert expand.out_channels == kept
    assert small.get_submodule("project.0").in_channels == kept
    assert small.get_submodule("dw.0").groups == kept


def test_squeeze_excitation_literal_view_keeps_channels():
    """A view with a literal channel count would break on fewer channels: not followed."""

    class Literal(SqueezeExcite):
        def forward(self, x):
            s = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
            return x * torch.sigmoid(self.expand(F.relu(self.reduce(s)))).view(-1, 12, 1, 1)

    model = SEBlock(linear=True)
    model.se = Literal(12, 4, linear=True)
    model = _masks(model, ["expand.1"], share={"dw.1": "expand.1"}, seed=10)
    _, small = _check(model, torch.randn(2, 6, 5, 5))
    assert small.get_submodule("se.expand").out_features == 12


# ---------------------------------------------------------------- whole models


def _small_resnet(block):
    return ResNet(block, (1, 2), widths=(8, 16), num_classes=5)


def _small_mobilenet():
    settings = ((1, 8, 1, 1), (4, 12, 2, 2), (4, 16, 2, 2))
    return MobileNetV2(num_classes=5, width_mult=0.5, settings=settings)


@pytest.mark.parametrize("make", [lambda: _small_resnet(BasicBlock),
                                  lambda: _small_resnet(Bottleneck), _small_mobilenet],
                         ids=["resnet-basic", "resnet-bottleneck", "mobilenet_v2"])
def test_whole_model_block_pruning(make):
    torch.manual_seed(11)
    dense = make()
    masked_model = prune_blocks(dense, keep=0.5)
    x = torch.randn(2, 3, 32, 32)
    masked, small = _check(masked_model, x)
    chosen = block_masks(dense)
    assert chosen and all(isinstance(masked_model.get_submodule(bn)[1], ChipMask) for bn in chosen)
    for bn, conv in chosen.items():
        kept = _kept(masked_model, bn)
        assert kept == max(1, int(0.5 * masked_model.get_submodule(bn)[0].num_features))
        assert small.get_submodule(conv).out_channels == kept
    before, after = small.compact_report.before, small.compact_report.after
    assert after.params < before.params and after.flops < before.flops
    if not isinstance(dense, MobileNetV2):  # no depthwise convs: mask_convolutions does it all
        assert pyprune.count(masked, x[:1].double()).flops == after.flops
    else:
        assert pyprune.count(masked, x[:1].double()).flops > after.flops


@pytest.mark.parametrize("make", [lambda: _small_resnet(BasicBlock), _small_mobilenet],
                         ids=["resnet", "mobilenet_v2"])
def test_convert_whole_model(make):
    torch.manual_seed(12)
    model = randomize_batchnorms(make()).double().eval()
    x = torch.randn(2, 3, 16, 16).double()
    convs = sum(type(m) is nn.Conv2d for m in model.modules())
    new, report = pyprune.convert(model, conv=True)
    assert len(report) == convs
    assert all(new_type == "MaskedConv2d" for _, _, new_type in report.replaced)
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), **TOL)
    acts = [n for n, m in model.named_modules() if type(m) in (nn.ReLU, nn.ReLU6)]
    new, report = pyprune.convert(model, relu="kwta")
    assert [n for n, _, _ in report.replaced] == acts
    for name, old, new_type in report.replaced:
        assert new_type == ("KWTA" if old == "ReLU" else "KWTA + Hardtanh")
    with torch.no_grad():
        new(x)


def test_convert_relu6_semantics():
    """ReLU6 -> the new activation capped at 6: k-WTA's winners pass unchanged below 6."""
    model, report = pyprune.convert(nn.Sequential(nn.ReLU6()), relu=lambda: KWTA(k=3))
    act = model[0]
    assert isinstance(act, nn.Sequential) and isinstance(act[0], KWTA)
    x = torch.tensor([[-1.0, 2.0, 9.0, 0.5, 7.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(act(x), torch.tensor([[0.0, 2.0, 6.0, 0.0, 6.0, 0.0]],
                                                    dtype=torch.float64))
    assert str(report) == "0  ReLU6 -> KWTA + Hardtanh"
    sap, report = pyprune.convert(nn.Sequential(nn.ReLU6()), relu="sap")
    assert isinstance(sap[0][0], SAP) and sap[0][1].max_val == 6.0


def test_convert_names_the_activations_it_can_replace():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardswish(), nn.SiLU(), nn.Conv2d(4, 4, 1),
                          nn.GELU())
    with pytest.raises(ValueError, match=r"relu='kwta' replaces nn.ReLU and nn.ReLU6 .* found "
                                         r"none of them; the model has: GELU, Hardswish, SiLU"):
        pyprune.convert(model, relu="kwta")
    with pytest.raises(ValueError, match="replaces nn.ReLU and nn.ReLU6"):
        pyprune.convert(model, relu="kwta", conv=True)  # not silently half done
    with pytest.raises(ValueError, match="no activation modules .* F.relu"):
        pyprune.convert(nn.Sequential(nn.Conv2d(3, 4, 3)), relu="sap")


# ---------------------------------------------------------------- pyprune layers in the model


class Gated(nn.Module):
    """FBS: a per-sample channel gate through the functional masked_conv2d, which fx cannot
    trace (it checks its arguments' types)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gate = ChannelGate(channels, channels, 0.5)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x):
        mask, scale = self.gate(x)
        y = pyprune.masked_conv2d(x, self.conv.weight, padding=1, out_mask=mask)
        return y * scale[:, :, None, None]


class EveryLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.kwta = KWTA(ratio=0.5)
        self.conv2 = MaskedConv2d(8, 8, 3, padding=1, bias=False)
        self.conv2.out_mask = torch.tensor([True, True, False, True, False, True, True, True])
        self.bn2 = nn.BatchNorm2d(8)
        self.kwta_channel = KWTA(k=4, mode="channel")
        self.conv2b = nn.Conv2d(8, 8, 1)
        self.conv3 = NoisyWeight(nn.Conv2d(8, 8, 1), std=0.1)
        self.bn3 = nn.BatchNorm2d(8)
        self.sap = SAP(ratio=1.0)
        self.noise = GaussianNoise(0.1)
        self.conv4 = MagnitudePruned(nn.Conv2d(8, 8, 3, padding=1), keep_ratio=0.5)
        self.gated = Gated(8)
        self.conv5 = nn.Conv2d(8, 6, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(6)
        self.cas = CAS(6, 4)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.kwta(self.bn1(self.conv1(x)))
        x = self.conv2b(self.kwta_channel(self.bn2(self.conv2(x))))
        x = self.noise(self.sap(self.bn3(self.conv3(x))))
        x = self.gated(self.conv4(x))
        x, logits = self.cas(F.relu(self.bn5(self.conv5(x))))
        return self.fc(x.mean((2, 3))) + logits


def test_every_pyprune_layer_with_batchnorm_folding():
    torch.manual_seed(13)
    model = _masks(EveryLayer(), ["bn1", "bn2", "bn5"], seed=13)
    model = randomize_batchnorms(model.double(), seed=2).eval()
    x = torch.randn(2, 3, 6, 6).double()
    with pytest.raises(ValueError, match=r"in module 'gated' \(Gated\): pass "
                                         r"leaf_modules=\['gated'\]"):
        pyprune.compact(model, x)

    def run(m):
        torch.manual_seed(99)  # SAP and the noise draw the same for the same shapes
        with torch.no_grad():
            return m(x)

    # SAP and the noise draw per memory position, so the same seed gives the same draws only
    # in the same layout: channels_last=False here, and the default below without them
    ref = run(model)
    for leaf in (["gated"], [Gated]):
        small = pyprune.compact(model, x, leaf_modules=leaf, channels_last=False)  # BN folded
        torch.testing.assert_close(run(small), ref, **TOL)
        masked = pyprune.mask_convolutions(model, x, leaf_modules=leaf, channels_last=False)
        torch.testing.assert_close(run(masked.eval()), ref, **TOL)
    # folded, but for the one after NoisyWeight (not a Conv2d)
    assert [n for n, m in small.named_modules() if isinstance(m, nn.BatchNorm2d)] == ["bn3"]
    fixed = copy.deepcopy(model)
    fixed.sap, fixed.noise, fixed.conv3 = nn.Identity(), nn.Identity(), model.conv3.layer
    with torch.no_grad():
        torch.testing.assert_close(pyprune.compact(fixed, x, leaf_modules=["gated"])(x),
                                   fixed(x), **TOL)
        torch.testing.assert_close(pyprune.mask_convolutions(fixed, x, leaf_modules=["gated"])(x),
                                   fixed(x), **TOL)
    kinds = {type(m) for m in small.modules()}
    assert {KWTA, SAP, GaussianNoise, NoisyWeight, MagnitudePruned, CAS, Gated} <= kinds
    # k-WTA over a whole sample counts every channel: the channels around it stay (masked
    # ones folded to zeros); channel-wise k-WTA is followed like a ReLU. conv2's out_mask
    # zeroes channels that bn2 makes constant again: only bn2's mask removes channels.
    assert small.conv1.out_channels == 8
    kept = _kept(model, "bn2")
    assert small.conv2.out_channels == kept and type(small.conv2) is nn.Conv2d
    assert small.conv2b.in_channels == kept
    assert small.conv5.out_channels == 6  # CAS reads every channel


def test_untraceable_model_names_the_module():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else -self.conv(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.body = nn.Sequential(nn.ReLU(), Branchy())

        def forward(self, x):
            return self.body(self.bn(self.conv(x)))

    model = _masks(Net(), ["bn"], seed=14).double().eval()
    x = torch.randn(2, 3, 5, 5).double()
    with pytest.raises(ValueError, match=r"in module 'body.1' \(Branchy\): pass "
                                         r"leaf_modules=\['body.1'\] \(or \[Branchy\]\)"):
        pyprune.compact(model, x)
    with pytest.raises(ValueError, match="leaf_modules"):
        pyprune.mask_convolutions(model, x)
    small = pyprune.compact(model, x, leaf_modules=["body.1"])
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), **TOL)
    assert small.conv.out_channels == 4  # the leaf reads every channel

    class Top(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(ValueError, match="the model's own forward"):
        pyprune.compact(Top(), x)
    with pytest.raises(ValueError, match="'nope' is not a submodule"):
        pyprune.compact(model, x, leaf_modules=["nope"])
    with pytest.raises(TypeError, match="leaf_modules must hold"):
        pyprune.compact(model, x, leaf_modules=[3])


def test_budget_follows_concatenation():
    """CHIPNet's FLOP budget (soft masks, differentiable) counts the conv inputs a concatenation
    feeds: after hard pruning it equals the compacted model's FLOP share."""
    torch.manual_seed(15)
    names = ["bn"] + [f"block.bns.{i}" for i in range(3)]
    model, _ = pyprune.convert(DenseNet(), chip_masks=lambda name, bn: name in names)
    x = torch.randn(1, 3, 8, 8)
    loss = pyprune.budget_loss(model, 0.5, "flops", example_input=x)
    loss.backward()
    assert all(model.get_submodule(n)[1].psi.grad.abs().sum() > 0 for n in names)
    model = _masks(DenseNet(), names, seed=15).eval()
    small = pyprune.compact(model, x, fold_batchnorm=False)

    def conv_flops(m):  # every conv here runs at 8x8
        return sum(c.in_channels * c.out_channels * c.kernel_size[0] ** 2 * 64
                   for c in m.modules() if isinstance(c, nn.Conv2d))

    small_flops, dense_flops = conv_flops(small), conv_flops(model)
    budget = pyprune.chipnet.budget(model, "flops", x)
    assert abs(float(budget) - small_flops / dense_flops) < 1e-6
