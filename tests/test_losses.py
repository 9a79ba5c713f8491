"""cas_loss, pc_loss and channel_activation_frequency against hand formulas."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pyprune


def test_cas_loss_formula_and_gradient():
    torch.manual_seed(0)
    label = torch.tensor([0, 2, 1, 2])
    logits = [torch.randn(4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    got = pyprune.cas_loss(logits, label, beta=2.0)
    want = 2.0 / 3 * sum(F.cross_entropy(lg, label) for lg in logits)
    torch.testing.assert_close(got, want)
    # d/dlogits of beta/S * CE = beta/S * (softmax - onehot) / N
    grads = torch.autograd.grad(got, logits)
    for lg, g in zip(logits, grads):
        hand = (lg.softmax(1) - F.one_hot(label, 3)) / 4 * (2.0 / 3)
        torch.testing.assert_close(g, hand)
    assert torch.allclose(pyprune.cas_loss(logits[:1], label, beta=0.5),
                          0.5 * F.cross_entropy(logits[0], label))


def test_cas_loss_bad_input():
    lg = torch.randn(4, 3)
    with pytest.raises(ValueError, match="at least one CAS module"):
        pyprune.cas_loss([], torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="logits_list must be a list"):
        pyprune.cas_loss(lg, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="label must be an int64"):
        pyprune.cas_loss([lg], torch.zeros(4))
    with pytest.raises(ValueError, match=r"label must have shape \(4,\)"):
        pyprune.cas_loss([lg], torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="logits_list\\[0\\] must be 2-D"):
        pyprune.cas_loss([torch.randn(4)], torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"logits_list\[1\] must have logits_list\[0\]'s shape \(4, 3\)"):
        pyprune.cas_loss([lg, torch.randn(4, 5)], torch.zeros(4, dtype=torch.int64))
    for bad, value in (([0, 1, 2, 3], 3), ([0, 1, -100, 2], -100), ([0, 1, -1, 2], -1)):
        with pytest.raises(ValueError, match=rf"label values must be in \[0, 3\), got {value}"):
            pyprune.cas_loss([lg], torch.tensor(bad))


def _pc_hand(f, c, y):
    total = 0.0
    for i in range(f.shape[0]):
        d = ((f[i] - c) ** 2).sum(1)
        others = [d[j] for j in range(c.shape[0]) if j != y[i]]
        total = total + d[y[i]] - sum(others) / (c.shape[0] - 1)
    return total / f.shape[0]


@pytest.mark.parametrize("classes", [2, 5])
def test_pc_loss_formula_and_gradient(classes):
    torch.manual_seed(1)
    f = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    c = torch.randn(classes, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randint(classes, (6,))
    got = pyprune.pc_loss(f, c, y)
    want = _pc_hand(f, c, y)
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got, (f, c))
    g_want = torch.autograd.grad(want, (f, c))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda a, b: pyprune.pc_loss(a, b, y), (f, c))
    # A feature on its centroid, far from the others, has negative loss.
    c0 = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    val = pyprune.pc_loss(torch.zeros(1, 2, dtype=torch.float64), c0, torch.tensor([0]))
    torch.testing.assert_close(val, torch.tensor(-25.0, dtype=torch.float64))


def test_pc_loss_flattens_and_checks():
    f = torch.randn(3, 2, 2, 2)
    c = torch.randn(4, 8)
    y = torch.tensor([0, 1, 3])
    torch.testing.assert_close(pyprune.pc_loss(f, c, y), pyprune.pc_loss(f.flatten(1), c, y))
    with pytest.raises(ValueError, match="at least 2 classes"):
        pyprune.pc_loss(f, torch.randn(1, 8), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"centroids must have shape \(num_classes, 8\)"):
        pyprune.pc_loss(f, torch.randn(4, 7), y)
    with pytest.raises(ValueError, match=r"label values must be in \[0, 4\)"):
        pyprune.pc_loss(f, c, torch.tensor([0, 1, 4]))
    with pytest.raises(TypeError, match="centroids must have features' dtype"):
        pyprune.pc_loss(f, c.double(), y)


def test_channel_activation_frequency():
    x = torch.zeros(4, 3, 2, 2)
    x[:, 0] = 1.0          # always the largest channel
    x[:2, 1] = 0.5         # active in half the samples
    x[:, 2] = 0.005        # below 0.01 * max everywhere
    freq = pyprune.channel_activation_frequency(x)
    torch.testing.assert_close(freq, torch.tensor([1.0, 0.5, 0.0]))
    # The threshold is relative to each sample's largest channel; (N, K) input works too.
    torch.testing.assert_close(
        pyprune.channel_activation_frequency(x.mean((2, 3)), threshold=0.001),
        torch.tensor([1.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        pyprune.channel_activation_frequency(torch.randn(5))
