"""Bad input (SPEC section 4) for every op and module: each case must raise the documented
exception type with a message naming the argument, before any kernel runs, and never crash.

The cases run in a child process per backend (one process for the whole batch, restarted
after the case it was running when it died), which prints one JSON line per case; a case that
kills the process (a signal, an abort) fails with its name.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from pyprune import _backend

# Names the cases' code can use.
PRELUDE = """
import math
import torch
import pyprune
from pyprune import nn as pnn

x2 = torch.randn(2, 60)
x4 = torch.randn(2, 3, 4, 5)
w_cas = torch.randn(4, 3)
b_cas = torch.randn(4)
label = torch.tensor([0, 3])
w_conv = torch.randn(6, 3, 3, 3)
b_conv = torch.randn(6)
meta4 = torch.randn(2, 3, 4, 5, device="meta")
"""

TE, VE, RE = "TypeError", "ValueError", "RuntimeError"

# (id, code, exception type name, regex the message must match). The regex names the argument.
COMMON_CASES = [
    # ---- kwta
    ("kwta-x-list", "pyprune.kwta([[1.0, 2.0]], k=1)", TE, r"x must be a torch.Tensor, got list"),
    ("kwta-x-int", "pyprune.kwta(torch.ones(2, 3, dtype=torch.int32), k=1)", TE,
     r"x must have a floating dtype .*got torch.int32"),
    ("kwta-x-bool", "pyprune.kwta(torch.ones(2, 3, dtype=torch.bool), k=1)", TE, r"x must have a floating dtype"),
    ("kwta-x-complex", "pyprune.kwta(torch.ones(2, 3, dtype=torch.complex64), k=1)", TE,
     r"x must have a floating dtype"),
    ("kwta-rank0", "pyprune.kwta(torch.tensor(1.0), k=1)", VE, r"x must have at least 2 dimensions"),
    ("kwta-rank1", "pyprune.kwta(torch.randn(5), k=1)", VE, r"x must have at least 2 dimensions, got shape \(5,\)"),
    ("kwta-channel-rank2", "pyprune.kwta(x2, k=1, mode='channel')", VE, r"x must have at least 3 dimensions"),
    ("kwta-mode", "pyprune.kwta(x4, k=1, mode='pixel')", VE, r"mode must be one of .*'pixel'"),
    ("kwta-mode-int", "pyprune.kwta(x4, k=1, mode=1)", VE, r"mode must be one of"),
    ("kwta-ratio-and-k", "pyprune.kwta(x2, 0.5, k=3)", VE, r"exactly one of ratio and k"),
    ("kwta-neither", "pyprune.kwta(x2)", VE, r"exactly one of ratio and k"),
    ("kwta-k0", "pyprune.kwta(x2, k=0)", VE, r"k must be in \[1, 60\].*got 0"),
    ("kwta-k-negative", "pyprune.kwta(x2, k=-3)", VE, r"k must be in \[1, 60\]"),
    ("kwta-k-too-big", "pyprune.kwta(x2, k=61)", VE, r"k must be in \[1, 60\].*got 61"),
    ("kwta-k-huge", "pyprune.kwta(x2, k=2**70)", VE, r"k must be in \[1, 60\]"),
    ("kwta-channel-k-too-big", "pyprune.kwta(x4, k=21, mode='channel')", VE, r"k must be in \[1, 20\]"),
    ("kwta-k-float", "pyprune.kwta(x2, k=1.5)", TE, r"k must be an int, got float"),
    ("kwta-k-bool", "pyprune.kwta(x2, k=True)", TE, r"k must be an int, got bool"),
    ("kwta-k-str", "pyprune.kwta(x2, k='3')", TE, r"k must be an int, got str"),
    ("kwta-k-tensor", "pyprune.kwta(x2, k=torch.tensor(3.0))", TE, r"k must be an int"),
    ("kwta-ratio-0", "pyprune.kwta(x2, 0.0)", VE, r"ratio must be in \(0, 1\]"),
    ("kwta-ratio-negative", "pyprune.kwta(x2, -0.5)", VE, r"ratio must be in \(0, 1\]"),
    ("kwta-ratio-above-1", "pyprune.kwta(x2, 1.5)", VE, r"ratio=1.5 .*ratio must be <= 1"),
    ("kwta-ratio-tiny", "pyprune.kwta(x2, 0.001)", VE, r"ratio=0.001 .*ratio must be >= 0.0167"),
    ("kwta-ratio-nan", "pyprune.kwta(x2, float('nan'))", VE, r"ratio must not be NaN"),
    ("kwta-ratio-inf", "pyprune.kwta(x2, float('inf'))", VE, r"ratio must be in \(0, 1\]"),
    ("kwta-ratio-huge", "pyprune.kwta(x2, 1e300)", VE, r"ratio must be in \(0, 1\]|ratio must be <= 1"),
    ("kwta-ratio-str", "pyprune.kwta(x2, '0.5')", TE, r"ratio must be a real number, got str"),
    ("kwta-ratio-bool", "pyprune.kwta(x2, True)", TE, r"ratio must be a real number, got bool"),
    ("kwta-absolute-int", "pyprune.kwta(x2, k=1, absolute=1)", TE, r"absolute must be a bool, got int"),
    ("kwta-empty-sample-group", "pyprune.kwta(torch.randn(2, 0, 3), k=1)", VE, r"x's sample group is empty"),
    ("kwta-empty-channel-group", "pyprune.kwta(torch.randn(2, 3, 0), k=1, mode='channel')", VE,
     r"x's channel group is empty"),
    ("kwta-empty-group-batch0", "pyprune.kwta(torch.randn(0, 0), k=1)", VE, r"x's sample group is empty"),
    ("kwta-device", "with pyprune.use_backend('cpu'): pyprune.kwta(meta4, k=1)", RE,
     r"pyprune.kwta: backend 'cpu' cannot run here: .*meta"),
    ("kwta-module-ratio-0", "pnn.KWTA(ratio=0.0)", VE, r"ratio must be in \(0, 1\]"),
    ("kwta-module-ratio-2", "pnn.KWTA(ratio=2.0)", VE, r"ratio must be in \(0, 1\]"),
    ("kwta-module-k0", "pnn.KWTA(k=0)", VE, r"k must be >= 1"),
    ("kwta-module-k-float", "pnn.KWTA(k=2.5)", TE, r"k must be an int"),
    ("kwta-module-neither", "pnn.KWTA()", VE, r"exactly one of ratio and k"),
    ("kwta-module-both", "pnn.KWTA(ratio=0.5, k=2)", VE, r"exactly one of ratio and k"),
    ("kwta-module-mode", "pnn.KWTA(k=1, mode='row')", VE, r"mode must be one of"),
    ("kwta-module-absolute", "pnn.KWTA(k=1, absolute='yes')", TE, r"absolute must be a bool"),
    ("kwta-module-k-above-group", "pnn.KWTA(k=5)(torch.randn(2, 4))", VE, r"k must be in \[1, 4\]"),
    ("kwta-module-x-list", "pnn.KWTA(k=1)([1.0])", TE, r"x must be a torch.Tensor"),
    # ---- sap
    ("sap-x-list", "pyprune.sap([[1.0]])", TE, r"x must be a torch.Tensor, got list"),
    ("sap-x-int", "pyprune.sap(torch.ones(2, 3, dtype=torch.int64))", TE, r"x must have a floating dtype"),
    ("sap-rank1", "pyprune.sap(torch.randn(5))", VE, r"x must have at least 2 dimensions"),
    ("sap-empty-group", "pyprune.sap(torch.randn(3, 0))", VE, r"x's sample group is empty"),
    ("sap-ratio-0", "pyprune.sap(x2, 0.0)", VE, r"ratio must be a finite number > 0, got 0.0"),
    ("sap-ratio-negative", "pyprune.sap(x2, -1.0)", VE, r"ratio must be a finite number > 0"),
    ("sap-ratio-nan", "pyprune.sap(x2, float('nan'))", VE, r"ratio must not be NaN"),
    ("sap-ratio-inf", "pyprune.sap(x2, float('inf'))", VE, r"ratio must be a finite number > 0"),
    ("sap-ratio-tiny", "pyprune.sap(x2, 0.001)", VE, r"ratio=0.001 draws .* = 0 samples.*ratio must be >="),
    ("sap-ratio-huge", "pyprune.sap(x2, 1e12)", VE,
     r"ratio=1000000000000.0 draws .*ratio must be <= 3.58e\+07 \(2147483647 draws a call\)"),
    ("sap-ratio-str", "pyprune.sap(x2, 'all')", TE, r"ratio must be a real number, got str"),
    ("sap-samples-0", "pyprune.sap(x2, samples=0)", VE, r"samples must be in \[1, 2147483647\], got 0"),
    ("sap-samples-negative", "pyprune.sap(x2, samples=-5)", VE, r"samples must be in \[1, 2147483647\]"),
    ("sap-samples-huge", "pyprune.sap(x2, samples=2**31)", VE, r"samples must be in \[1, 2147483647\], got 2147483648"),
    ("sap-samples-float", "pyprune.sap(x2, samples=10.0)", TE, r"samples must be an int, got float"),
    ("sap-samples-bool", "pyprune.sap(x2, samples=True)", TE, r"samples must be an int, got bool"),
    ("sap-exact-int", "pyprune.sap(x2, exact=1)", TE, r"exact must be a bool, got int"),
    ("sap-generator-int", "pyprune.sap(x2, generator=0)", TE, r"generator must be a torch.Generator or None, got int"),
    ("sap-generator-str", "pyprune.sap(x2, generator='cpu')", TE, r"generator must be a torch.Generator or None, got str"),
    ("sap-generator-random", "import random; pyprune.sap(x2, generator=random.Random(0))", TE,
     r"generator must be a torch.Generator or None, got Random"),
    ("sap-device", "with pyprune.use_backend('cpu'): pyprune.sap(meta4)", RE,
     r"pyprune.sap: backend 'cpu' cannot run here"),
    ("sap-module-ratio-0", "pnn.SAP(ratio=0.0)", VE, r"ratio must be > 0"),
    ("sap-module-samples-0", "pnn.SAP(samples=0)", VE, r"samples must be in \[1, 2147483647\]"),
    ("sap-module-samples-float", "pnn.SAP(samples=1.5)", TE, r"samples must be an int"),
    ("sap-module-exact", "pnn.SAP(exact='no')", TE, r"exact must be a bool"),
    ("sap-module-rank1", "pnn.SAP()(torch.randn(4))", VE, r"x must have at least 2 dimensions"),
    ("sap-module-ratio-huge", "pnn.SAP(ratio=1e12)(x2)", VE, r"ratio must be <= 3.58e\+07"),
    # ---- gaussian_noise
    ("noise-x-list", "pyprune.gaussian_noise([1.0], 0.1)", TE, r"x must be a torch.Tensor, got list"),
    ("noise-x-int", "pyprune.gaussian_noise(torch.ones(3, dtype=torch.int32), 0.1)", TE,
     r"x must have a floating dtype"),
    ("noise-std-negative", "pyprune.gaussian_noise(x2, -0.1)", VE, r"std must be a finite number >= 0, got -0.1"),
    ("noise-std-nan", "pyprune.gaussian_noise(x2, float('nan'))", VE, r"std must not be NaN"),
    ("noise-std-inf", "pyprune.gaussian_noise(x2, float('inf'))", VE, r"std must be a finite number >= 0"),
    ("noise-std-str", "pyprune.gaussian_noise(x2, '0.1')", TE, r"std must be a real number, got str"),
    ("noise-std-tensor", "pyprune.gaussian_noise(x2, torch.tensor(0.1))", TE, r"std must be a real number"),
    ("noise-std-missing", "pyprune.gaussian_noise(x2)", TE, r"std"),
    ("noise-multiplicative-int", "pyprune.gaussian_noise(x2, 0.1, multiplicative=1)", TE,
     r"multiplicative must be a bool"),
    ("noise-generator-int", "pyprune.gaussian_noise(x2, 0.1, generator=3)", TE,
     r"generator must be a torch.Generator or None, got int"),
    ("noise-device", "with pyprune.use_backend('cpu'): pyprune.gaussian_noise(meta4, 0.1)", RE,
     r"backend 'cpu' cannot run here"),
    ("noise-module-std", "pnn.GaussianNoise(-1.0)", VE, r"std must be a finite number >= 0"),
    ("noise-module-std-nan", "pnn.GaussianNoise(float('nan'))", VE, r"std must not be NaN"),
    ("noise-module-multiplicative", "pnn.GaussianNoise(0.1, multiplicative='yes')", TE,
     r"multiplicative must be a bool"),
    # ---- magnitude_mask
    ("mag-w-list", "pyprune.magnitude_mask([1.0, 2.0], 0.5)", TE, r"w must be a torch.Tensor, got list"),
    ("mag-w-int", "pyprune.magnitude_mask(torch.ones(4, dtype=torch.int64), 0.5)", TE, r"w must have a floating dtype"),
    ("mag-w-rank0", "pyprune.magnitude_mask(torch.tensor(1.0), 1.0)", VE, r"w must have at least 1 dimensions"),
    ("mag-w-empty", "pyprune.magnitude_mask(torch.randn(3, 0), 0.5)", VE, r"w is empty"),
    ("mag-ratio-0", "pyprune.magnitude_mask(x2, 0.0)", VE, r"keep_ratio must be in \(0, 1\], got 0.0"),
    ("mag-ratio-above-1", "pyprune.magnitude_mask(x2, 1.5)", VE, r"keep_ratio must be in \(0, 1\]"),
    ("mag-ratio-negative", "pyprune.magnitude_mask(x2, -0.5)", VE, r"keep_ratio must be in \(0, 1\]"),
    ("mag-ratio-nan", "pyprune.magnitude_mask(x2, float('nan'))", VE, r"keep_ratio must not be NaN"),
    ("mag-ratio-inf", "pyprune.magnitude_mask(x2, float('inf'))", VE, r"keep_ratio must be in \(0, 1\]"),
    ("mag-ratio-str", "pyprune.magnitude_mask(x2, 'half')", TE, r"keep_ratio must be a real number"),
    ("mag-device", "with pyprune.use_backend('cpu'): pyprune.magnitude_mask(meta4, 0.5)", RE,
     r"backend 'cpu' cannot run here"),
    # ---- cas
    ("cas-x-list", "pyprune.cas([1.0], w_cas)", TE, r"x must be a torch.Tensor, got list"),
    ("cas-x-int", "pyprune.cas(torch.ones(2, 3, 4, 5, dtype=torch.int32), w_cas)", TE, r"x must have a floating dtype"),
    ("cas-x-rank3", "pyprune.cas(torch.randn(2, 3, 4), w_cas)", VE, r"x must be 4-D, got shape \(2, 3, 4\)"),
    ("cas-x-rank5", "pyprune.cas(torch.randn(2, 3, 4, 5, 1), w_cas)", VE, r"x must be 4-D"),
    ("cas-x-no-channels", "pyprune.cas(torch.randn(2, 0, 4, 5), torch.randn(4, 0))", VE,
     r"x must have at least one channel and one spatial element"),
    ("cas-x-no-spatial", "pyprune.cas(torch.randn(2, 3, 0, 5), w_cas)", VE,
     r"x must have at least one channel and one spatial element"),
    ("cas-weight-list", "pyprune.cas(x4, [[1.0]])", TE, r"weight must be a torch.Tensor"),
    ("cas-weight-rank1", "pyprune.cas(x4, torch.randn(3))", VE, r"weight must be 2-D"),
    ("cas-weight-k", "pyprune.cas(x4, torch.randn(4, 5))", VE,
     r"weight must have shape \(num_classes >= 1, 3\) .*got \(4, 5\)"),
    ("cas-weight-no-classes", "pyprune.cas(x4, torch.randn(0, 3))", VE, r"weight must have shape \(num_classes >= 1, 3\)"),
    ("cas-weight-dtype", "pyprune.cas(x4, w_cas.double())", TE, r"weight must have x's dtype torch.float32, got torch.float64"),
    ("cas-weight-int", "pyprune.cas(x4, w_cas.int())", TE, r"weight must have a floating dtype"),
    ("cas-bias-rank2", "pyprune.cas(x4, w_cas, b_cas[None])", VE, r"bias must be 1-D"),
    ("cas-bias-shape", "pyprune.cas(x4, w_cas, torch.randn(5))", VE, r"bias must have shape \(4,\), got \(5,\)"),
    ("cas-bias-dtype", "pyprune.cas(x4, w_cas, b_cas.half())", TE, r"bias must have x's dtype"),
    ("cas-bias-list", "pyprune.cas(x4, w_cas, [0.0] * 4)", TE, r"bias must be a torch.Tensor"),
    ("cas-label-list", "pyprune.cas(x4, w_cas, b_cas, [0, 1])", TE, r"label must be a torch.Tensor or None, got list"),
    ("cas-label-int", "pyprune.cas(x4, w_cas, b_cas, 1)", TE, r"label must be a torch.Tensor or None, got int"),
    ("cas-label-int32", "pyprune.cas(x4, w_cas, b_cas, label.int())", TE,
     r"label must be an int64 tensor of class indices, got torch.int32"),
    ("cas-label-float", "pyprune.cas(x4, w_cas, b_cas, label.float())", TE, r"label must be an int64 tensor"),
    ("cas-label-shape", "pyprune.cas(x4, w_cas, b_cas, label[:1])", VE,
     r"label must have shape \(2,\) \(one class per sample\), got \(1,\)"),
    ("cas-label-rank2", "pyprune.cas(x4, w_cas, b_cas, label[:, None])", VE, r"label must have shape \(2,\)"),
    ("cas-label-too-big", "pyprune.cas(x4, w_cas, b_cas, torch.tensor([0, 4]))", VE,
     r"label values must be in \[0, 4\)"),
    ("cas-label-negative", "pyprune.cas(x4, w_cas, b_cas, torch.tensor([-1, 0]))", VE,
     r"label values must be in \[0, 4\)"),
    ("cas-label-huge", "pyprune.cas(x4, w_cas, None, torch.tensor([2**40, 0]))", VE,
     r"label values must be in \[0, 4\)"),
    ("cas-label-min-int64", "pyprune.cas(x4, w_cas, None, torch.tensor([0, -2**63]))", VE,
     r"label values must be in \[0, 4\)"),
    ("cas-weight-device", "pyprune.cas(x4, w_cas.to('meta'))", VE,
     r"tensors must be on one device, got x on cpu, weight on meta"),
    ("cas-label-device", "pyprune.cas(x4, w_cas, None, label.to('meta'))", VE,
     r"tensors must be on one device.*label on meta"),
    ("cas-device", "with pyprune.use_backend('cpu'): pyprune.cas(meta4, w_cas.to('meta'))", RE,
     r"pyprune.cas: backend 'cpu' cannot run here"),
    ("cas-module-channels", "pnn.CAS(0, 10)", VE, r"in_channels and num_classes must be >= 1"),
    ("cas-module-classes", "pnn.CAS(3, 0)", VE, r"in_channels and num_classes must be >= 1"),
    ("cas-module-float", "pnn.CAS(3.5, 10)", TE, r"in_channels must be an int"),
    ("cas-module-no-label", "pnn.CAS(3, 4).train()(x4)", VE, r"CAS in training mode needs the labels"),
    ("cas-module-x-channels", "pnn.CAS(5, 4).eval()(x4)", VE, r"weight must have shape \(num_classes >= 1, 3\)"),
    ("cas-module-label-range", "pnn.CAS(3, 4).train()(x4, torch.tensor([1, 9]))", VE,
     r"label values must be in \[0, 4\)"),
    ("cas-loss-label-range", "pyprune.cas_loss([torch.randn(2, 4)], torch.tensor([0, 4]))", VE,
     r"label values must be in \[0, 4\)"),
    ("cas-loss-label-int32", "pyprune.cas_loss([torch.randn(2, 4)], torch.tensor([0, 1], dtype=torch.int32))",
     TE, r"label must be an int64 tensor"),
    ("cas-loss-empty", "pyprune.cas_loss([], label)", VE, r"logits_list must hold the logits of at least one"),
    ("cas-loss-not-list", "pyprune.cas_loss(torch.randn(2, 4), label)", TE, r"logits_list must be a list or tuple"),
    ("cas-loss-shapes", "pyprune.cas_loss([torch.randn(2, 4), torch.randn(2, 5)], label)", VE,
     r"logits_list\[1\] must have logits_list\[0\]'s shape"),
    # ---- masked_conv2d
    ("conv-x-list", "pyprune.masked_conv2d([1.0], w_conv)", TE, r"x must be a torch.Tensor, got list"),
    ("conv-x-int", "pyprune.masked_conv2d(x4.int(), w_conv)", TE, r"x must have a floating dtype"),
    ("conv-x-rank3", "pyprune.masked_conv2d(x4[0], w_conv)", VE, r"x must be 4-D, got shape \(3, 4, 5\)"),
    ("conv-weight-rank2", "pyprune.masked_conv2d(x4, w_conv.flatten(1))", VE, r"weight must be 4-D"),
    ("conv-weight-dtype", "pyprune.masked_conv2d(x4, w_conv.double())", TE, r"weight must have x's dtype"),
    ("conv-weight-channels", "pyprune.masked_conv2d(x4, torch.randn(6, 2, 3, 3))", VE,
     r"weight of shape \(6, 2, 3, 3\) with groups=1 expects 2 input channels, x has 3"),
    ("conv-groups-0", "pyprune.masked_conv2d(x4, w_conv, groups=0)", VE, r"groups must be >= 1 and divide"),
    ("conv-groups-negative", "pyprune.masked_conv2d(x4, w_conv, groups=-3)", VE, r"groups must be >= 1"),
    ("conv-groups-not-dividing", "pyprune.masked_conv2d(x4, torch.randn(6, 1, 3, 3), groups=2)", VE,
     r"groups must be >= 1 and divide the input \(3\)"),
    ("conv-groups-out-not-dividing", "pyprune.masked_conv2d(torch.randn(2, 4, 5, 5), torch.randn(5, 2, 3, 3), groups=2)",
     VE, r"groups must be >= 1 and divide the input \(4\) and output \(5\)"),
    ("conv-groups-float", "pyprune.masked_conv2d(x4, w_conv, groups=1.0)", TE, r"groups must be an int"),
    ("conv-bias-shape", "pyprune.masked_conv2d(x4, w_conv, torch.randn(5))", VE, r"bias must have shape \(6,\)"),
    ("conv-bias-dtype", "pyprune.masked_conv2d(x4, w_conv, b_conv.double())", VE, r"bias must have shape \(6,\) and dtype torch.float32"),
    ("conv-bias-rank2", "pyprune.masked_conv2d(x4, w_conv, b_conv[None])", VE, r"bias must be 1-D"),
    ("conv-stride-0", "pyprune.masked_conv2d(x4, w_conv, stride=0)", VE, r"stride must be >= 1, got 0"),
    ("conv-stride-pair-0", "pyprune.masked_conv2d(x4, w_conv, stride=(1, 0))", VE, r"stride must be >= 1"),
    ("conv-stride-triple", "pyprune.masked_conv2d(x4, w_conv, stride=(1, 1, 1))", TE,
     r"stride must be an int or a pair of ints"),
    ("conv-stride-float", "pyprune.masked_conv2d(x4, w_conv, stride=1.5)", TE, r"stride must be an int or a pair of ints"),
    ("conv-stride-bool", "pyprune.masked_conv2d(x4, w_conv, stride=True)", TE, r"stride must be an int or a pair of ints"),
    ("conv-padding-negative", "pyprune.masked_conv2d(x4, w_conv, padding=-1)", VE, r"padding must be >= 0"),
    ("conv-padding-str", "pyprune.masked_conv2d(x4, w_conv, padding='full')", VE,
     r"padding must be one of \('valid', 'same'\), got 'full'"),
    ("conv-padding-same-stride", "pyprune.masked_conv2d(x4, w_conv, stride=2, padding='same')", VE,
     r"padding='same' needs stride 1"),
    ("conv-padding-float", "pyprune.masked_conv2d(x4, w_conv, padding=0.5)", TE, r"padding must be an int or a pair"),
    ("conv-dilation-0", "pyprune.masked_conv2d(x4, w_conv, dilation=0)", VE, r"dilation must be >= 1"),
    ("conv-dilation-list3", "pyprune.masked_conv2d(x4, w_conv, dilation=[1, 1, 1])", TE,
     r"dilation must be an int or a pair"),
    ("conv-kernel-too-big", "pyprune.masked_conv2d(torch.randn(2, 3, 2, 2), w_conv)", VE,
     r"the input's spatial size \(2, 2\) with padding \(0, 0\) is smaller than the dilated kernel"),
    ("conv-dilated-kernel-too-big", "pyprune.masked_conv2d(x4, w_conv, dilation=3)", VE,
     r"is smaller than the dilated kernel \(7 in dim 2\)"),
    ("conv-in-mask-shape", "pyprune.masked_conv2d(x4, w_conv, in_mask=torch.ones(4, dtype=torch.bool))", VE,
     r"in_mask must have shape \(3,\) or \(2, 3\), got \(4,\)"),
    ("conv-in-mask-batch", "pyprune.masked_conv2d(x4, w_conv, in_mask=torch.ones(3, 3, dtype=torch.bool))", VE,
     r"in_mask must have shape \(3,\) or \(2, 3\), got \(3, 3\)"),
    ("conv-in-mask-rank3", "pyprune.masked_conv2d(x4, w_conv, in_mask=torch.ones(2, 3, 1, dtype=torch.bool))", VE,
     r"in_mask must have shape"),
    ("conv-in-mask-int", "pyprune.masked_conv2d(x4, w_conv, in_mask=torch.ones(3, dtype=torch.int64))", TE,
     r"in_mask must be bool \(structural\) or x's dtype torch.float32 \(soft\), got torch.int64"),
    ("conv-in-mask-dtype", "pyprune.masked_conv2d(x4, w_conv, in_mask=torch.ones(3, dtype=torch.float16))", TE,
     r"in_mask must be bool .*got torch.float16"),
    ("conv-in-mask-list", "pyprune.masked_conv2d(x4, w_conv, in_mask=[True, True, False])", TE,
     r"in_mask must be a torch.Tensor or None, got list"),
    ("conv-out-mask-shape", "pyprune.masked_conv2d(x4, w_conv, out_mask=torch.ones(3, dtype=torch.bool))", VE,
     r"out_mask must have shape \(6,\) or \(2, 6\), got \(3,\)"),
    ("conv-out-mask-int", "pyprune.masked_conv2d(x4, w_conv, out_mask=torch.ones(6, dtype=torch.uint8))", TE,
     r"out_mask must be bool"),
    ("conv-out-mask-scalar", "pyprune.masked_conv2d(x4, w_conv, out_mask=torch.tensor(True))", VE,
     r"out_mask must have shape \(6,\) or \(2, 6\), got \(\)"),
    ("conv-weight-mask-shape", "pyprune.masked_conv2d(x4, w_conv, weight_mask=torch.ones(6, 3, 3, 1, dtype=torch.bool))",
     VE, r"weight_mask must have weight's shape \(6, 3, 3, 3\), got \(6, 3, 3, 1\)"),
    ("conv-weight-mask-int", "pyprune.masked_conv2d(x4, w_conv, weight_mask=torch.ones(6, 3, 3, 3, dtype=torch.int32))",
     TE, r"weight_mask must be bool or x's dtype"),
    ("conv-weight-mask-list", "pyprune.masked_conv2d(x4, w_conv, weight_mask=1.0)", TE,
     r"weight_mask must be a torch.Tensor or None, got float"),
    ("conv-weight-device", "pyprune.masked_conv2d(x4, w_conv.to('meta'))", VE, r"tensors must be on one device.*weight on meta"),
    ("conv-mask-device", "pyprune.masked_conv2d(x4, w_conv, in_mask=torch.ones(3, dtype=torch.bool, device='meta'))",
     VE, r"tensors must be on one device.*in_mask on meta"),
    ("conv-device", "with pyprune.use_backend('cpu'): pyprune.masked_conv2d(meta4, w_conv.to('meta'))", RE,
     r"pyprune.masked_conv2d: backend 'cpu' cannot run here"),
    ("conv-module-from-linear", "pnn.MaskedConv2d.from_conv(torch.nn.Linear(3, 4))", TE,
     r"conv must be an nn.Conv2d, got Linear"),
    ("conv-module-set-mask-list", "pnn.MaskedConv2d(3, 6, 3).set_masks(in_mask=[1, 0, 1])", TE,
     r"in_mask must be a torch.Tensor or None, got list"),
    ("conv-module-x-channels", "pnn.MaskedConv2d(4, 6, 3)(x4)", VE, r"expects 4 input channels, x has 3"),
    ("conv-module-mask-shape",
     "m = pnn.MaskedConv2d(3, 6, 3); m.out_mask = torch.ones(5, dtype=torch.bool); m(x4)", VE,
     r"out_mask must have shape \(6,\) or \(2, 6\), got \(5,\)"),
    ("conv-module-cached-x-channels",
     "m = pnn.MaskedConv2d(4, 6, 3); m.out_mask = torch.ones(6, dtype=torch.bool)\n"
     "with torch.no_grad(): m(x4)", VE, r"x must have 4 channels|expects 4 input channels, x has 3"),
    ("conv-module-cached-x-dtype",
     "m = pnn.MaskedConv2d(3, 6, 3); m.out_mask = torch.ones(6, dtype=torch.bool)\n"
     "with torch.no_grad(): m(x4.half())", TE, r"x must have the weight's dtype|weight must have x's dtype"),
    ("conv-module-x-rank3", "pnn.MaskedConv2d(3, 6, 3)(x4[0])", VE, r"x must be 4-D"),
    ("gate-channels", "pnn.ChannelGate(0, 4, 0.5)", VE, r"in_channels and out_channels must be >= 1"),
    ("gate-ratio-0", "pnn.ChannelGate(3, 4, 0.0)", VE, r"keep_ratio must be in \(0, 1\]"),
    ("gate-ratio-big", "pnn.ChannelGate(3, 4, 1.5)", VE, r"keep_ratio must be in \(0, 1\]"),
    ("gate-ratio-str", "pnn.ChannelGate(3, 4, 'half')", TE, r"keep_ratio must be a real number"),
    ("gate-x-channels", "pnn.ChannelGate(5, 4, 0.5)(x4)", VE, r"x must have 5 channels, got 3"),
    ("gate-x-rank", "pnn.ChannelGate(3, 4, 0.5)(x4[0])", VE, r"x must be 4-D"),
    ("chip-channels", "pnn.ChipMask(0)", VE, r"num_channels must be >= 1"),
    ("chip-channels-float", "pnn.ChipMask(2.5)", TE, r"num_channels must be an int"),
    ("chip-beta", "pnn.ChipMask(3, beta=0.0)", VE, r"beta and gamma must be > 0"),
    ("chip-gamma-nan", "pnn.ChipMask(3, gamma=float('nan'))", VE, r"gamma must not be NaN"),
    ("chip-x-channels", "pnn.ChipMask(4)(x4)", VE, r"x must have 4 channels in dim 1"),
]

# Only where a backend is forced that cannot take the dtype: a RuntimeError naming the backend.
TRITON_CASES = [
    ("triton-kwta-float64", "pyprune.kwta(x2.double(), k=1)", RE,
     r"pyprune.kwta: backend 'triton' supports dtypes float32, float16, bfloat16; got torch.float64"),
    ("triton-sap-float64", "pyprune.sap(x2.double())", RE, r"pyprune.sap: backend 'triton' supports dtypes"),
    ("triton-noise-float64", "pyprune.gaussian_noise(x2.double(), 0.1)", RE,
     r"pyprune.gaussian_noise: backend 'triton' supports dtypes"),
    ("triton-mag-float64", "pyprune.magnitude_mask(x2.double(), 0.5)", RE,
     r"pyprune.magnitude_mask: backend 'triton' supports dtypes"),
    ("triton-cas-float64", "pyprune.cas(x4.double(), w_cas.double())", RE,
     r"pyprune.cas: backend 'triton' supports dtypes"),
    ("triton-conv-float64", "pyprune.masked_conv2d(x4.double(), w_conv.double())", RE,
     r"pyprune.masked_conv2d: backend 'triton' supports dtypes"),
]

RUNNER = r"""
import json, re, sys
backend, cases = sys.argv[1], json.load(sys.stdin)
ns = {}
exec(PRELUDE, ns)
import pyprune
with pyprune.use_backend(backend):
    for name, code, _types, _pattern in cases:
        print(json.dumps({"start": name}), flush=True)
        try:
            exec(code, dict(ns))
            result = {"case": name, "raised": None, "message": ""}
        except BaseException as e:
            result = {"case": name, "raised": type(e).__name__, "message": str(e)}
        print(json.dumps(result), flush=True)
"""


def _run_batch(backend: str, cases: list) -> dict:
    """Run the cases in child processes; a case that kills its process is recorded with the
    signal or exit status and the batch resumes after it."""
    results: dict = {}
    todo = list(cases)
    script = "PRELUDE = " + repr(PRELUDE) + "\n" + RUNNER
    while todo:
        proc = subprocess.run(
            [sys.executable, "-c", script, backend],
            input=json.dumps(todo), capture_output=True, text=True, timeout=600,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )
        started = None
        for line in proc.stdout.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "start" in record:
                started = record["start"]
            else:
                results[record["case"]] = record
                started = None
        done = [c for c in todo if c[0] in results]
        if proc.returncode != 0 or len(done) < len(todo):
            crashed = started or next((c[0] for c in todo if c[0] not in results), None)
            if crashed is None:
                break
            results[crashed] = {
                "case": crashed, "crashed": proc.returncode,
                "stderr": textwrap.shorten(proc.stderr[-2000:], 2000),
            }
        todo = [c for c in todo if c[0] not in results]
    return results


def _param(backend: str):
    marks = [pytest.mark.triton] if backend == "triton" else []
    reason = _backend.unavailable_reason(backend, "cpu")
    if reason is not None:
        marks.append(pytest.mark.skip(reason=reason))
    return pytest.param(backend, marks=marks, id=backend)


_CACHE: dict = {}


def _cases_for(backend: str) -> list:
    return COMMON_CASES + (TRITON_CASES if backend == "triton" else [])


def _results(backend: str) -> dict:
    if backend not in _CACHE:
        cases = [[n, c, t if isinstance(t, str) else list(t), p] for n, c, t, p in _cases_for(backend)]
        _CACHE[backend] = _run_batch(backend, cases)
    return _CACHE[backend]


def _check(backend: str, case) -> None:
    import re

    name, _code, types, pattern = case
    types = (types,) if isinstance(types, str) else tuple(types)
    result = _results(backend).get(name)
    assert result is not None, f"{name}: no result (the child process did not reach it)"
    if "crashed" in result:
        pytest.fail(f"{name} ({backend}): the process died with status {result['crashed']}:\n"
                    f"{result['stderr']}")
    assert result["raised"] is not None, f"{name} ({backend}): no exception raised"
    assert result["raised"] in types, (
        f"{name} ({backend}): raised {result['raised']}({result['message']!r}), expected {types}")
    assert re.search(pattern, result["message"]), (
        f"{name} ({backend}): message {result['message']!r} does not match {pattern!r}")


# The known defects, by (backend, case): see the xfail reasons.
KNOWN_DEFECTS: dict[tuple[str, str], str] = {}


def _case_params(cases, backends):
    params = []
    for backend in backends:
        for case in cases:
            marks = list(backend.marks)
            reason = KNOWN_DEFECTS.get((backend.values[0], case[0]))
            if reason is not None:
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            params.append(pytest.param(backend.values[0], case, marks=marks,
                                       id=f"{backend.values[0]}-{case[0]}"))
    return params


BACKENDS = [_param(b) for b in ("reference", "cpu", "triton")]


@pytest.mark.parametrize("backend,case", _case_params(COMMON_CASES, BACKENDS))
def test_bad_input(backend, case):
    _check(backend, case)


@pytest.mark.parametrize("backend,case", _case_params(TRITON_CASES, [_param("triton")]))
def test_bad_input_triton_dtype(backend, case):
    _check(backend, case)


def test_every_case_named_once():
    names = [c[0] for c in COMMON_CASES + TRITON_CASES]
    assert len(names) == len(set(names))


def test_runner_names_a_crashing_case():
    """A case that kills the child process is reported by name, and the batch goes on."""
    cases = [["fine", "raise ValueError('x must be fine')", "ValueError", "x"],
             ["dies", "import os; os.abort()", "ValueError", "x"],
             ["after", "raise TypeError('k must be an int')", "TypeError", "k"]]
    results = _run_batch("reference", cases)
    assert results["fine"]["raised"] == "ValueError"
    assert results["dies"]["crashed"] != 0
    assert results["after"]["raised"] == "TypeError"
