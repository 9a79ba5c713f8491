"""The references against small cases worked out by hand: they are the spec the kernels meet."""
from __future__ import annotations

import math

import pytest
import torch

from pyprune import reference as R

nan, inf = float("nan"), float("inf")


def test_kwta_sample_and_channel():
    x = torch.tensor([[[3.0, -1.0], [2.0, 5.0]], [[0.0, 0.0], [-2.0, 1.0]]])
    # sample mode, k=2: sample 0 keeps 5 and 3; sample 1: 2nd largest of (0,0,-2,1) is 0, ties kept
    assert torch.equal(R.kwta(x, 2), torch.tensor([[[3.0, 0], [0, 5.0]], [[0.0, 0.0], [0, 1.0]]]))
    # channel mode, k=1: the largest of each row
    assert torch.equal(
        R.kwta(x, 1, "channel"), torch.tensor([[[3.0, 0], [0, 5.0]], [[0.0, 0.0], [0, 1.0]]])
    )
    # absolute, k=1 per channel: |-2| wins in row (−2, 1)
    assert torch.equal(
        R.kwta(x, 1, "channel", absolute=True),
        torch.tensor([[[3.0, 0], [0, 5.0]], [[0.0, 0.0], [-2.0, 0]]]),
    )


def test_kwta_nan_and_inf():
    x = torch.tensor([[1.0, nan, -inf, inf, 2.0]])
    out = R.kwta(x, 2)  # NaN ranks largest, then inf
    assert torch.equal(out.isnan(), torch.tensor([[False, True, False, False, False]]))
    assert out[0, 3] == inf and out[0, 4] == 0 and out[0, 0] == 0
    assert R.kwta_mask(torch.tensor([[nan, nan, 1.0]]), 1).tolist() == [[True, True, False]]
    # -inf kept only when k reaches it
    assert R.kwta(x, 5)[0, 2] == -inf


def test_kwta_gradient_is_masked():
    x = torch.tensor([[1.0, 4.0, 2.0, 3.0]], requires_grad=True)
    R.kwta(x, 2).backward(torch.tensor([[10.0, 20.0, 30.0, 40.0]]))
    assert x.grad.tolist() == [[0.0, 20.0, 0.0, 40.0]]


def test_sap_keep_probability_is_stable():
    x = torch.tensor([[1.0, 1.0, 2.0, 0.0]], dtype=torch.float64)
    q = R.sap_keep_probability(x, 3)
    p = torch.tensor([0.25, 0.25, 0.5, 0.0], dtype=torch.float64)
    assert torch.allclose(q[0], 1 - (1 - p) ** 3)
    # p = 1e-9 and r = 1000: the naive float32 form rounds (1 - p) to 1 and gives q = 0.
    big = torch.zeros(1, 10**6)
    big[0, 0] = 1.0
    big[0, 1:] = 1e-9 / (1 - 1e-9) * (1 - 1e-9)
    q32 = R.sap_keep_probability(big, 1000)
    p1 = big[0, 1].double() / big.double().sum()
    assert q32[0, 1] > 0
    assert math.isclose(q32[0, 1].item(), -math.expm1(1000 * math.log1p(-p1.item())), rel_tol=1e-3)


def test_sap_single_draw_keeps_one_element_scaled():
    x = torch.tensor([[0.0, 2.0, 0.0, 0.0]])  # all mass on one element: q = 1, kept unscaled
    for exact in (True, False):
        assert torch.equal(R.sap(x, 1, exact=exact), x)
    y = R.sap(torch.tensor([[1.0, -1.0, 2.0]]), 1, exact=True, generator=torch.Generator().manual_seed(0))
    assert int((y != 0).sum()) == 1  # r = 1: exactly one element survives
    kept = y[y != 0]
    p = torch.tensor([0.25, 0.25, 0.5])[y[0] != 0]
    assert torch.allclose(kept.abs(), torch.tensor([1.0, 1.0, 2.0])[y[0] != 0] / p)  # q = p when r = 1


def test_sap_zero_sample_gives_zeros_and_is_seeded():
    x = torch.zeros(2, 5)
    x[1] = torch.arange(5.0)
    out = R.sap(x, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[0], torch.zeros(5))
    again = R.sap(x, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_sap_exact_beyond_multinomial_categories(monkeypatch):
    """Samples of more elements than torch.multinomial takes (2^24) draw by inverse transform:
    only nonzero elements are drawn, at their keep probabilities (a smaller limit here, so that
    the frequencies can be compared with q; tolerance 5 sigma of 40000 rows), and a real
    2^24 + 8 element sample runs."""
    x = torch.tensor([[1.0, 0.0, 3.0, 2.0, 0.5, 0.0]]).expand(40000, 6).contiguous()
    monkeypatch.setattr(R, "_MULTINOMIAL_CATEGORIES", 4)
    kept = R.sap(x, 2, True, torch.Generator().manual_seed(1)) != 0
    q = R.sap_keep_probability(x[:1].double(), 2)[0]
    freq = kept.double().mean(0)
    assert (freq - q).abs().max() <= 5 * math.sqrt(0.25 / 40000)
    assert not kept[:, [1, 5]].any() and (kept.sum(1) <= 2).all()
    monkeypatch.undo()
    length = 2**24 + 8
    big = torch.zeros(1, length)
    big[0, [3, 2**24 + 2, length - 1]] = torch.tensor([1.0, 1.0, 2.0])
    out = R.sap(big, 300, True, torch.Generator().manual_seed(0))
    assert out[0].nonzero().view(-1).tolist() == [3, 2**24 + 2, length - 1]


def test_gaussian_noise():
    x = torch.arange(6.0).view(2, 3)
    assert torch.equal(R.gaussian_noise(x, 0.0), x)
    assert torch.equal(R.gaussian_noise(x, 0.0, multiplicative=True), x)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)) * 0.5
    assert torch.equal(R.gaussian_noise(x, 0.5, generator=g), x + noise)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(R.gaussian_noise(x, 0.5, multiplicative=True, generator=g), x * (1 + noise))


def test_magnitude_mask():
    w = torch.tensor([[0.5, -3.0], [2.0, -2.0]])
    assert R.magnitude_mask(w, 0.25).tolist() == [[False, True], [False, False]]
    assert R.magnitude_mask(w, 0.5).tolist() == [[False, True], [True, True]]  # tie at |2| kept
    assert R.magnitude_mask(w, 1.0).all()


def test_cas_hand_case():
    x = torch.tensor([[[[1.0, 3.0]], [[2.0, 2.0]]]])  # N=1, K=2, H=1, W=2: means (2, 2)
    weight = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, -1.0]])  # C=3 classes
    bias = torch.tensor([0.0, 0.0, 10.0])
    out, logits = R.cas(x, weight, bias)
    assert logits.tolist() == [[2.0, 3.0, 8.0]]
    assert torch.equal(out, x * torch.tensor([0.0, -1.0]).view(1, 2, 1, 1))  # argmax = class 2
    out, _ = R.cas(x, weight, bias, label=torch.tensor([1]))
    assert torch.equal(out, x * torch.tensor([0.5, 1.0]).view(1, 2, 1, 1))


def test_cas_gradient_reaches_weight_through_mask_and_logits():
    x = torch.ones(1, 2, 1, 1)
    weight = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    out, logits = R.cas(x, weight, label=torch.tensor([0]))
    (out.sum() + logits.sum()).backward()
    # out = x * weight[0] contributes 1 to row 0; logits = mean(x) @ W.T contributes 1 everywhere
    assert weight.grad.tolist() == [[2.0, 2.0], [1.0, 1.0]]


def test_masked_conv2d_hand_case():
    x = torch.tensor([[[[1.0]], [[2.0]], [[inf]]]])  # 1x1 conv over 3 channels
    weight = torch.tensor([[[[1.0]], [[1.0]], [[1.0]]], [[[2.0]], [[0.0]], [[0.0]]]])
    bias = torch.tensor([0.5, 0.5])
    in_mask = torch.tensor([True, True, False])  # structural: the inf channel takes no part
    y = R.masked_conv2d(x, weight, bias, in_mask=in_mask)
    assert y.flatten().tolist() == [3.5, 2.5]
    y = R.masked_conv2d(x, weight, bias, in_mask=in_mask, out_mask=torch.tensor([False, True]))
    assert y.flatten().tolist() == [0.0, 2.5]  # bias of the masked channel is gone too
    wm = torch.ones_like(weight, dtype=torch.bool)
    wm[0, 1] = False
    y = R.masked_conv2d(x, weight, bias, in_mask=in_mask, weight_mask=wm)
    assert y.flatten().tolist() == [1.5, 2.5]
    # float masks multiply; per-sample (N, C) masks
    y = R.masked_conv2d(x[:, :2], weight[:, :2], None, out_mask=torch.tensor([[0.5, 2.0]]))
    assert y.flatten().tolist() == [1.5, 4.0]


def test_chipnet_mask_functions():
    psi = torch.tensor([0.0, 2.0])
    zt = R.chip_z_tilde(psi, beta=1.0)
    assert torch.allclose(zt, torch.tensor([0.5, 1 / (1 + math.exp(-2.0))]))
    z = R.chip_z(psi, beta=1.0, gamma=2.0)
    want = 1 - torch.exp(-2.0 * zt) + zt * math.exp(-2.0)
    assert torch.allclose(z, want)
    assert math.isclose(R.chip_z(torch.tensor([0.0]), 1.0, 2.0).item(), 1 - math.exp(-1) + 0.5 * math.exp(-2), rel_tol=1e-6)
    assert math.isclose(R.crispness(psi, 1.0, 2.0).item(), ((zt - want) ** 2).sum().item(), rel_tol=1e-6)
    # psi0 shifts the logistic
    assert R.chip_z_tilde(torch.tensor([1.0]), 3.0, psi0=1.0).item() == pytest.approx(0.5)
