"""CHIPNet masks and losses, budget V(z), compact() and convert() on residual models."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyprune
from pyprune import reference
from pyprune.nn import ChipMask, KWTA, MaskedConv2d, SAP

from .conftest import compile_and_backward


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock (one nn.ReLU module used twice)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, widths=(8, 16), classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(widths[0], widths[0]), BasicBlock(widths[0], widths[0]))
        self.layer2 = nn.Sequential(BasicBlock(widths[0], widths[1], 2), BasicBlock(widths[1], widths[1]))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[1], classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _randomize(model, seed=0, prune=True):
    """Random BatchNorm statistics and mask parameters; prune every ChipMask at 0.5."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
        if isinstance(m, ChipMask):
            m.psi.data.copy_(torch.randn(m.num_channels, generator=gen))
            if prune:
                m.prune(0.5)
    return model


# ---------------------------------------------------------------- ChipMask and losses


def test_chip_mask_matches_reference():
    m = ChipMask(7, beta=2.5, gamma=4.0, psi0=0.1)
    m.psi.data = torch.randn(7)
    torch.testing.assert_close(m.z_tilde(), reference.chip_z_tilde(m.psi, 2.5, 0.1))
    torch.testing.assert_close(m.z(), reference.chip_z(m.psi, 2.5, 4.0, 0.1))
    x = torch.randn(3, 7, 4, 4)
    torch.testing.assert_close(m(x), x * m.z().view(1, -1, 1, 1))
    keep = m.prune(0.5)
    assert torch.equal(keep, reference.chip_z(m.psi, 2.5, 4.0, 0.1) > 0.5)
    x[:, ~keep] = float("inf")  # removed channels are exactly 0, whatever they held
    out = m(x)
    assert (out[:, ~keep] == 0).all() and torch.equal(out[:, keep], x[:, keep])
    # state_dict round trip keeps the hard mask, beta and gamma
    fresh = ChipMask(7)
    fresh.load_state_dict(m.state_dict())
    assert fresh.pruned and torch.equal(fresh.hard_mask, keep) and float(fresh.gamma) == 4.0


def test_crispness_loss_formula():
    model = nn.Sequential(ChipMask(5, beta=3.0, gamma=8.0), ChipMask(3, beta=3.0, gamma=8.0))
    for m in model:
        m.psi.data = torch.randn(m.num_channels)
    want = sum(reference.crispness(m.psi, 3.0, 8.0) for m in model)
    torch.testing.assert_close(pyprune.crispness_loss(model), want)
    torch.testing.assert_close(pyprune.crispness_loss(model, "mean"), want / 8)
    pyprune.crispness_loss(model).backward()
    # d/dpsi of (zt - z)^2, by the chain rule through the formulas
    psi = model[0].psi.detach().requires_grad_()
    (reference.crispness(psi, 3.0, 8.0)).backward()
    torch.testing.assert_close(model[0].psi.grad, psi.grad)


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.m1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), ChipMask(4)
        self.conv2, self.bn2, self.m2 = nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), ChipMask(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = F.relu(self.m1(self.bn1(self.conv1(x))))
        x = F.relu(self.m2(self.bn2(self.conv2(x))))
        return self.fc(x.mean((2, 3)))


def test_budget_copies_channel_groups_to_a_device_once():
    """The channel groups of a traced model (CPU tensors) go to the masks' device once: later
    budget calls make no host-to-device copy (a CUDA graph cannot capture one). The meta device
    stands in for a GPU."""
    from pyprune import _graph

    model = TwoLayer()
    pyprune.chipnet.budget(model, "params", torch.randn(2, 3, 8, 8))
    groups = _graph._GROUPS[pyprune.chipnet._PLANS[model]]
    label, frozen = groups.on(torch.device("meta"))
    assert label.device.type == "meta" and frozen.device.type == "meta"
    again = groups.on(torch.device("meta"))
    assert again[0] is label and again[1] is frozen
    assert groups.on(torch.device("cpu"))[0] is groups.label and groups.on(None)[0] is groups.label


def test_budget_hand_counts():
    torch.manual_seed(0)
    model = TwoLayer()
    for m in (model.m1, model.m2):
        m.psi.data = torch.randn(m.num_channels)
    x = torch.randn(2, 3, 8, 8)
    # channels count as sigmoid(10 (z - 0.5)), CHIPNet's sharpened count
    z1, z2 = (torch.sigmoid(10 * (m.z() - 0.5)).sum() for m in (model.m1, model.m2))
    hw1, hw2 = 64, 16
    want = {
        "channels": (z1 + z2) / 10,
        "params": (3 * z1 * 9 + z1 * z2 * 9) / (3 * 4 * 9 + 4 * 6 * 9),
        "flops": (3 * z1 * 9 * hw1 + z1 * z2 * 9 * hw2) / (3 * 4 * 9 * hw1 + 4 * 6 * 9 * hw2),
        "volume": (z1 * hw1 + z2 * hw2) / (4 * hw1 + 6 * hw2),
    }
    for kind, value in want.items():
        torch.testing.assert_close(pyprune.chipnet.budget(model, kind, x), value)
        loss = pyprune.budget_loss(model, 0.5, kind, x)
        torch.testing.assert_close(loss, (value - 0.5) ** 2)
    # hard masks count exactly
    model.m1.prune(0.5)
    model.m2.prune(0.5)
    k1, k2 = int(model.m1.hard_mask.sum()), int(model.m2.hard_mask.sum())
    torch.testing.assert_close(float(pyprune.chipnet.budget(model, "params")),
                               (3 * k1 * 9 + k1 * k2 * 9) / (3 * 4 * 9 + 4 * 6 * 9))
    # the budget is differentiable in psi
    model.m1.unprune()
    model.m2.unprune()
    pyprune.budget_loss(model, 0.3, "flops").backward()
    assert model.m1.psi.grad is not None and model.m1.psi.grad.abs().sum() > 0


@pytest.mark.parametrize("call, error, message", [
    (lambda m: pyprune.budget_loss(m, 0.0), ValueError, r"budget must be in \(0, 1\]"),
    (lambda m: pyprune.budget_loss(m, 1.5), ValueError, r"budget must be in \(0, 1\]"),
    (lambda m: pyprune.budget_loss(m, 0.5, "energy"), ValueError, "kind must be one of"),
    (lambda m: pyprune.budget_loss(nn.Sequential(nn.Conv2d(3, 4, 3)), 0.5), ValueError,
     "no prunable layers"),
    (lambda m: pyprune.crispness_loss(nn.Linear(2, 2)), ValueError, "no prunable layers"),
    (lambda m: pyprune.budget_loss(m, 0.5, "params"), ValueError, "needs example_input"),
    (lambda m: pyprune.compact(m, [1, 2]), TypeError, "example_input must be a torch.Tensor"),
    (lambda m: pyprune.convert(m), ValueError, "nothing to convert"),
    (lambda m: pyprune.convert(m, cas=["layer9"], num_classes=3), ValueError, "not a submodule"),
    (lambda m: pyprune.convert(nn.Linear(2, 2), relu="kwta"), ValueError, "none of the layers"),
    (lambda m: pyprune.convert(m, relu="tanh"), ValueError, "relu must be one of"),
], ids=["zero", "above-one", "kind", "no-masks", "crisp-no-masks", "no-example", "example-type",
        "nothing", "cas-name", "no-layers", "relu-name"])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call(TwoLayer())


# ---------------------------------------------------------------- compact and convert


def test_compact_residual_resnet_matches_masked():
    torch.manual_seed(0)
    model, report = pyprune.convert(ResNet(), chip_masks=True)
    assert len(report) == 10  # stem + 4 blocks x 2 + one downsample BatchNorm
    _randomize(model).eval()
    x = torch.randn(4, 3, 12, 12)
    small = pyprune.compact(model, x)
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)
    r = small.compact_report
    assert r.after.params < r.before.params and r.after.flops < r.before.flops
    assert r.before == pyprune.count(model, x) and r.after == pyprune.count(small, x)
    # the convs inside a block lose exactly the channels their mask removed
    mask = model.layer1[0].bn1[1].hard_mask
    conv1 = small.get_submodule("layer1.0.conv1")
    assert conv1.out_channels == int(mask.sum())
    assert small.get_submodule("layer1.0.conv2").in_channels == int(mask.sum())
    # residual channels: kept unless every branch masks them
    stem = model.bn1[1].hard_mask
    branches = [stem] + [model.layer1[i].bn2[1].hard_mask for i in range(2)]
    shared = torch.stack(branches).any(0)
    assert small.conv1.out_channels == int(shared.sum())
    assert small.fc.in_features <= 16


def test_mask_convolutions_matches_masked():
    torch.manual_seed(1)
    model, _ = pyprune.convert(ResNet(), chip_masks=True)
    _randomize(model, seed=1).eval()
    x = torch.randn(3, 3, 10, 10)
    masked = pyprune.mask_convolutions(model, x).eval()
    nchw = pyprune.mask_convolutions(model, x, channels_last=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(masked(x), model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(nchw(x), model(x), atol=1e-5, rtol=1e-5)
    assert masked.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert nchw.layer1[0].conv1.weight.is_contiguous()
    with pytest.raises(TypeError, match="channels_last must be a bool"):
        pyprune.mask_convolutions(model, x, channels_last="yes")
    conv = masked.layer1[0].conv1
    assert isinstance(conv, MaskedConv2d) and conv.weight.shape == model.layer1[0].conv1.weight.shape
    assert torch.equal(conv.out_mask, model.layer1[0].bn1[1].hard_mask)
    assert conv.in_mask is not None  # the stem's mask (union over the residual sums) feeds it
    assert isinstance(model.layer1[0].conv1, nn.Conv2d) and type(model.layer1[0].conv1) is nn.Conv2d


def _chip_block(bn: nn.Module, act: nn.Module, pruned: bool) -> nn.Module:
    """conv -> bn -> ChipMask (two channels near zero, pruned or soft) -> act -> 1x1 conv."""
    chip = ChipMask(6)
    with torch.no_grad():
        chip.psi.copy_(torch.tensor([-3.0, 0.2, 0.5, 2.0, -1.0, 1.0]))
    if pruned:
        chip.prune()
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), bn, chip, act, nn.Conv2d(6, 4, 1)).eval()


class _FunctionalHardtanh(nn.Module):
    def __init__(self, lo: float, hi: float) -> None:
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x):
        return F.hardtanh(x, self.lo, self.hi)


@pytest.mark.parametrize("pruned", [False, True])
def test_compact_mask_after_batchnorm_without_affine(pruned):
    """A ChipMask after a BatchNorm without weight and bias: compact keeps its scale (soft: z,
    pruned: 0 / 1) after the BatchNorm, so the outputs equal the masked model's."""
    torch.manual_seed(2)
    model = _chip_block(nn.BatchNorm2d(6, affine=False), nn.ReLU(), pruned)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pyprune.compact(model, x)(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act,removes", [
    (nn.Hardtanh(0.25, 1.0), False), (nn.Hardtanh(-2.0, -0.5), False),
    (_FunctionalHardtanh(0.25, 1.0), False), (nn.Hardtanh(-1.0, 1.0), True),
    (nn.ReLU6(), True), (_FunctionalHardtanh(-0.5, 2.0), True)])
def test_compact_keeps_channels_an_activation_makes_nonzero(act, removes):
    """A masked channel is removed only where what follows maps 0 to 0: a hardtanh whose range
    leaves out 0 makes it a constant, which the next convolution reads (compact and
    mask_convolutions keep it)."""
    torch.manual_seed(3)
    model = _chip_block(nn.BatchNorm2d(6), act, pruned=True)
    x = torch.randn(2, 3, 8, 8)
    small = pyprune.compact(model, x)
    masked = pyprune.mask_convolutions(model, x).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(masked(x), model(x), atol=1e-5, rtol=1e-5)
    first = next(m for m in small.modules() if isinstance(m, nn.Conv2d))
    kept = int(model[2].hard_mask.sum())
    assert kept < 6 and first.out_channels == (kept if removes else 6)


def test_compact_hand_count():
    model = TwoLayer().eval()
    _randomize(model)
    model.m1.hard_mask = torch.tensor([True, False, True, False])
    model.m2.hard_mask = torch.tensor([False, True, True, False, False, True])
    x = torch.randn(2, 3, 8, 8)
    small = pyprune.compact(model, x, fold_batchnorm=False, channels_last=False)
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)
    # conv1 3->2, bn1 2, conv2 2->3, bn2 3, fc 3->2
    params = (2 * 3 * 9 + 2) + 2 * 2 + (3 * 2 * 9 + 3) + 2 * 3 + (3 * 2 + 2)  # masks are gone
    assert small.compact_report.after.params == params
    folded = pyprune.compact(model, x)  # BatchNorms folded into the convs, channels_last
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    assert folded.compact_report.after.params == params - 2 * 2 - 2 * 3
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert folded.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    flops = 2 * (3 * 9 * 2 * 64 + 2 * 9 * 3 * 16 + 3 * 2)
    assert small.compact_report.after.flops == flops


def test_compact_masked_conv_out_mask():
    conv1, conv2 = MaskedConv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)
    conv1.out_mask = torch.tensor([True, False, True, True, False, False])
    model = nn.Sequential(conv1, nn.ReLU(), conv2).eval()
    x = torch.randn(2, 3, 7, 7)
    small = pyprune.compact(model, x)
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)
    assert small.get_submodule("0").out_channels == 3
    assert small.get_submodule("2").in_channels == 3


def test_compact_sequential_with_flatten_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), ChipMask(8), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), ChipMask(6), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    _randomize(model).eval()
    x = torch.randn(2, 3, 6, 6)
    small = pyprune.compact(model, x)
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)
    assert small.get_submodule("10").in_features == int(model[6].hard_mask.sum())


def test_convert_nested():
    torch.manual_seed(0)
    model = ResNet()
    new, report = pyprune.convert(model, relu="kwta", conv=True, cas=["layer2"], num_classes=10)
    assert new is not model and isinstance(model.relu, nn.ReLU)  # a copy by default
    kinds = {(old, n) for _, old, n in report.replaced}
    assert ("ReLU", "KWTA") in kinds and ("Conv2d", "MaskedConv2d") in kinds
    assert ("Sequential", "Sequential + CAS") in kinds
    convs = [m for m in new.modules() if type(m) is nn.Conv2d]
    assert not convs and isinstance(new.layer1[0].relu, KWTA)
    assert new.layer1[0].conv1.weight is not model.layer1[0].conv1.weight  # copied model
    x, y = torch.randn(4, 3, 8, 8), torch.randint(10, (4,))
    pyprune.set_cas_label(new, y)
    out = new(x)
    logits = pyprune.cas_logits(new)
    assert out.shape == (4, 10) and len(logits) == 1 and logits[0].shape == (4, 10)
    loss = F.cross_entropy(out, y) + pyprune.cas_loss(logits, y)
    loss.backward()
    # in place, with a factory
    same, report = pyprune.convert(model, relu=lambda: SAP(ratio=1.0), inplace=True)
    assert same is model and isinstance(model.layer2[1].relu, SAP)
    assert "SAP" in str(report)


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_convert_torch_pruned(monkeypatch, path):
    """Convolutions pruned with torch.nn.utils.prune (unstructured and structured) become
    MaskedConv2d with the same parameter and a bool weight mask: same outputs and gradients,
    the sparse convolution or the dense engine underneath."""
    from torch.nn.utils import prune

    monkeypatch.setenv("PYPRUNE_SPARSE_CONV", path)
    torch.manual_seed(0)
    model = ResNet()
    prune.l1_unstructured(model.layer1[0].conv1, "weight", amount=0.9)
    prune.ln_structured(model.layer2[0].conv2, "weight", amount=0.5, n=1, dim=0)
    prune.random_unstructured(model.layer2[1].conv1, "weight", amount=0.5)
    model.eval()
    new, _ = pyprune.convert(model, conv=True)
    for name in ("layer1.0.conv1", "layer2.0.conv2", "layer2.1.conv1"):
        old, conv = model.get_submodule(name), new.get_submodule(name)
        assert isinstance(conv, MaskedConv2d) and conv.weight_mask.dtype == torch.bool
        assert torch.equal(conv.weight_mask, old.weight_mask != 0)
        assert torch.equal(conv.weight, old.weight_orig)
        assert "weight_orig" not in dict(conv.named_parameters())
    x = torch.randn(3, 3, 8, 8)
    with pyprune.use_backend("cpu"):
        got = new(x)
    want = model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.square().sum().backward()
    want.square().sum().backward()
    for name in ("layer1.0.conv1", "layer2.1.conv1"):
        torch.testing.assert_close(new.get_submodule(name).weight.grad,
                                   model.get_submodule(name).weight_orig.grad, atol=1e-4, rtol=1e-4)
    # in place, the parameter itself is kept
    orig = model.layer1[0].conv1.weight_orig
    same, _ = pyprune.convert(model, conv=True, inplace=True)
    assert same.layer1[0].conv1.weight is orig
    pruned_bias = nn.Conv2d(3, 4, 3)
    prune.l1_unstructured(pruned_bias, "bias", amount=0.5)
    with pytest.raises(ValueError, match="a bias pruned with torch.nn.utils.prune"):
        pyprune.convert(nn.Sequential(pruned_bias), conv=True)


def test_convert_then_compile():
    torch.manual_seed(0)
    model, _ = pyprune.convert(ResNet(), relu="kwta", chip_masks=True, conv=True)
    compile_and_backward(model, torch.randn(2, 3, 8, 8))


def test_chipnet_prune_loop():
    torch.manual_seed(0)
    model, _ = pyprune.convert(TwoLayer(), chip_masks=False, conv=True)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(2, (8,))) for _ in range(3)]
    records = []
    history = pyprune.chipnet.prune(model, data, budget=0.5, kind="flops", epochs=2,
                                    log=records.append, progress=False)
    assert history == records and len(history) == 2
    assert set(history[0]) >= {"loss", "accuracy", "budget", "hard_budget", "beta", "gamma"}
    assert history[1]["gamma"] > history[0]["gamma"]
    assert all(m.pruned for m in model.modules() if isinstance(m, ChipMask))
    assert math.isclose(history[-1]["hard_budget"], float(pyprune.chipnet.budget(model, "flops")))


def test_schedule():
    assert pyprune.chipnet.schedule(0) == (1.0, 2.0)
    beta, gamma = pyprune.chipnet.schedule(4)
    assert math.isclose(beta, 1.08) and math.isclose(gamma, 8.0)
    assert pyprune.chipnet.schedule(1000) == (6.0, 256.0)
