"""The roofline model of the GPU benchmarks (benchmarks/roofline.py): it covers every benchmark
case, its byte and FLOP counts are the kernels' passes, and the committed predictions are its
current output. CPU only, no kernel runs."""
from __future__ import annotations

import csv
import itertools
import math
import pathlib

import pytest

from benchmarks import harness, roofline
from benchmarks.harness import Case

OPS = harness.discover_ops()


def kernels(op: str, case: Case, provider: str, mode: str, gpu: str = "h200") -> dict:
    """The plan's launches by name (the last of a repeated name)."""
    p = roofline.plan(op, case, provider, mode, gpu)
    return {k.name: k for k in p.items if isinstance(k, roofline.Kernel)}


def test_every_benchmark_case_has_a_prediction():
    """Every case of every benchmark module, every mode and provider, on every GPU: a finite
    positive time (an op or variant added without a model raises)."""
    assert set(OPS) == set(roofline.MODELS)
    for gpu in roofline.GPUS:
        for op, module in OPS.items():
            for case in module.CASES:
                for mode in harness.MODES:
                    preds = roofline.predict_case(op, case, mode, gpu)
                    assert set(preds) == set(roofline.PROVIDERS)
                    for pr in preds.values():
                        assert math.isfinite(pr.predicted_us) and pr.predicted_us > 0
                        assert pr.predicted_us >= pr.lower_bound_us


@pytest.mark.parametrize(("op", "case"), [
    ("masked_conv", Case((32, 128, 16, 16), "diag50")),
    ("masked_conv", Case((32, 128, 16, 16), "out")),
    ("kwta", Case((8, 64, 32, 32), "group")),
    ("sap", Case((8, 64, 32, 32))),
    ("cas", Case((8, 64, 8, 8), "c100")),
    ("noise", Case((8, 64), "uniform")),
    ("new_op", Case((8, 64))),
])
def test_a_case_without_a_model_fails(op, case):
    with pytest.raises(ValueError, match="no .*model"):
        roofline.predict_case(op, case, "forward", "h200")


def test_kwta_bytes():
    case = Case((128, 64, 32, 32))
    n = 128 * 64 * 32 * 32 * 4
    # 128 groups of 65536, all in flight at once in clusters of 2 blocks (264 / 128). The
    # candidates of a block fit in shared memory after the first digit: pass 1 reads x, pass 2
    # and the masked write reread it, out is written. x (32 MiB) exceeds half the L2 (30 MB of
    # the H200's 60): the rereads come from HBM.
    k = kernels("kwta", case, roofline.CUDA, "forward")["kwta_block_kernel<512> cluster 2"]
    assert (k.hbm, k.l2, k.ctas) == (4 * n, 0, 128 * 2)
    # Half of it (16 MiB): the rereads hit L2.
    k = kernels("kwta", Case((128, 128, 16, 16)), roofline.CUDA, "forward")
    k = k["kwta_block_kernel<512> cluster 2"]
    assert (k.hbm, k.l2, k.ctas) == (n, n, 128 * 2)
    # 256 groups (more than 2 blocks an SM would leave idle at one a group): one block a group.
    k = kernels("kwta", Case((256, 64, 32, 32)), roofline.CUDA, "forward")["kwta_block_kernel<512> cluster 1"]
    assert (k.hbm, k.ctas) == (8 * n, 256)
    # 32 groups of 802816 (103 MB): clusters of 8 (264 / 32), every group at once, x reread from
    # HBM. (The launch once ran L2-sized rounds of groups; the H200 run measured that 7x over
    # the model of the time, and the model's fitted cost a radix pass makes the rounds cost more
    # than the DRAM rereads they save.)
    k = kernels("kwta", Case((32, 256, 56, 56)), roofline.CUDA, "forward")
    assert list(k) == ["kwta_block_kernel<512> cluster 8"]
    k = k["kwta_block_kernel<512> cluster 8"]
    assert (k.hbm, k.ctas) == (4 * 32 * 256 * 56 * 56 * 4, 32 * 8)
    assert kernels("kwta", case, roofline.CUDA, "backward")["kwta backward"].hbm == 3 * n
    # Triton, groups of 65536 > 4096: the split path's three launches. The sample reads 1024
    # values (L / 64) of each of the 128 groups and writes a 32-byte scratch row and 1024 bin
    # counts. Its bracket spans the sample ranks 47..157 (r = 6553 / 65536 * 1024 = 102.4,
    # margin 4 * sqrt(1024 q (1 - q)) + 16 = 54.4): 110 / 1024 of a group, 7040 candidates
    # (value and position). The filter reads x once, writes out once and the candidates; the
    # finish program of each group stores the band's kept values again: x (33.5 MB) is more
    # than half the L2, so those sectors are HBM traffic.
    k = kernels("kwta", case, roofline.TRITON, "forward")
    cand = 128 * 7040 * (4 + 4)
    assert set(k) == {"_kwta_sample_kernel", "_kwta_filter_kernel", "_kwta_finish_kernel"}
    assert k["_kwta_sample_kernel"].hbm == 128 * (1024 * 4 + 32 + 1024 * 4)
    assert k["_kwta_filter_kernel"].hbm == 2 * n + cand
    assert k["_kwta_filter_kernel"].ctas == 128 * 32  # chunks of 2048: 4096 programs >= 264
    assert k["_kwta_finish_kernel"].ctas == 128 and k["_kwta_finish_kernel"].hbm > 0
    # Batch 8: chunks halve to 1024 (8 * 64 = 512 programs); x (2 MiB) fits in the L2, so the
    # kept band's sectors are L2 traffic.
    k = kernels("kwta", Case((8, 64, 32, 32)), roofline.TRITON, "forward")
    assert k["_kwta_filter_kernel"].ctas == 512
    assert k["_kwta_filter_kernel"].hbm == 2 * n / 16 + cand / 16
    assert k["_kwta_finish_kernel"].hbm == 0
    # Groups of 1024 (channel): one program a group in registers, x read once, out written.
    k = kernels("kwta", Case((128, 64, 32, 32), "channel"), roofline.TRITON, "forward")
    assert k["_kwta_forward_kernel"].hbm == 2 * n
    # Eager backward: grad and the saved bool mask read, grad_x written.
    assert kernels("kwta", case, roofline.EAGER, "backward")["grad * mask"].hbm == 2 * n + n / 4
    # Channel groups of 1024 run the warp kernel: x once from HBM, reread from L2, out written.
    k = kernels("kwta", Case((128, 64, 32, 32), "channel"), roofline.CUDA, "forward")
    assert (k["kwta_warp_kernel"].hbm, k["kwta_warp_kernel"].l2) == (2 * n, n)


def test_sap_bytes():
    # Exact mode at 128x64x32x32; bernoulli mode where it takes two launches: a row of 65537
    # elements (L % 4 != 0, 33 chunks).
    for variant, length in (("exact", 65536), ("bernoulli", 65537)):
        exact = variant == "exact"
        n = 128 * length * 4
        case = Case((128, 64, 32, 32) if exact else (128, length), variant)
        fwd = kernels("sap", case, roofline.CUDA, "forward")
        assert not any("seed" in name for name in fwd)  # drawn on the host: no launch
        # sap.cu: partials read x once (+ the (N, K + NB) float workspace; exact mode at r = L
        # also writes each draw's position: NB * 1024 floats a sample), the prefix rewrites the
        # workspace, pass 3 reads x again (33.5 MB: more than half the L2, so from HBM), exact
        # mode the positions of the 3 draw chunks reaching each element chunk (from HBM too),
        # and writes out. K = ceil(L / 2048) element chunks, NB = ceil(65540 / 1024) draw chunks.
        k_chunks, nb = (32, 65) if exact else (33, 0)
        ws = 128 * (k_chunks + nb) * 4
        kept = 128 * nb * 1024 * 4
        assert roofline.cuda_sap_chunks(length, length, exact)[:2] == (k_chunks, nb)
        assert fwd["sap_partials_kernel"].hbm == n + ws + kept
        assert fwd["sap_partials_kernel"].ctas == 128 * (k_chunks + nb)
        # 33 chunks: each bernoulli block adds the sample's partials itself; 32 and 65: each
        # merge block makes the sample's prefix sums itself.
        assert "sap_prefix_kernel" not in fwd
        third = "sap_merge_kernel" if exact else "sap_bernoulli_kernel"
        read_back = 128 * k_chunks * 3 * 1024 * 4 if exact else 0
        assert fwd[third].hbm == 2 * n + read_back
        bwd = kernels("sap", case, roofline.CUDA, "backward")
        assert bwd["sap_partials_kernel"].hbm == n + ws + kept
        assert bwd[third].hbm == 3 * n + read_back  # x again, grad, grad_x
    # Exact samples of more than 256 chunks of either kind: the prefix launch rewrites the
    # workspace (L = 2^19: 256 element chunks, 513 draw chunks).
    k_chunks, nb = roofline.cuda_sap_chunks(1 << 19, 1 << 19, True)[:2]
    assert (k_chunks, nb) == (256, 513)
    big = kernels("sap", Case((8, 1 << 19), "exact"), roofline.CUDA, "forward")
    assert big["sap_prefix_kernel"].hbm == 2 * 8 * (k_chunks + nb) * 4
    assert list(big) == ["sap_partials_kernel", "sap_prefix_kernel", "sap_merge_kernel"]
    # Batch 8 in two launches: x (2 MiB) stays in L2 between the partials and pass 3; each of
    # the KW blocks of a sample reads its K partials from L2.
    n = 8 * 65537 * 4
    k = kernels("sap", Case((8, 65537), "bernoulli"), roofline.CUDA, "forward")
    _, _, _, kw = roofline.cuda_sap_chunks(65537, 65537, False)
    assert (k["sap_bernoulli_kernel"].hbm, k["sap_bernoulli_kernel"].l2) == (n, n + 8 * kw * 33 * 4)
    eager = kernels("sap", Case((128, 64, 32, 32), "exact"), roofline.EAGER, "forward")
    assert eager["multinomial: sampleMultinomialWithReplacement"].hbm == 128 * 65536 * 8
    # Bernoulli samples of up to 64 chunks: one launch, a cluster a sample, x read once;
    # backward reads grad too. 16384 elements (8 chunks) at batch 128: 4 chunks a block,
    # clusters of 2 (256 blocks fill the 132 SMs); 65536 elements: clusters of 8 at batch 128,
    # of 16 blocks of 2 chunks at batch 8 (64 blocks of 4 would leave SMs idle).
    small = 128 * 256 * 8 * 8 * 4
    case = Case((128, 256, 8, 8), "bernoulli")
    for mode, reads in (("forward", 1), ("backward", 2)):
        k = kernels("sap", case, roofline.CUDA, mode)
        assert list(k) == ["sap_bernoulli_cluster_kernel"]
        assert k["sap_bernoulli_cluster_kernel"].hbm == (reads + 1) * small
        assert k["sap_bernoulli_cluster_kernel"].ctas == 128 * 2
    # Triton: one launch (its counters kept zero between launches: no fill). 16384 elements
    # at batch 128: items of two
    # blocks of 4096, a partials item a sample (16384 elements), 2 elementwise items; the
    # partials read x from HBM, the elementwise items LAG = 44 samples later from L2, and write
    # out (backward: grad from HBM too); the lead is the first LAG samples' partials.
    cfg = roofline.triton_sap_bernoulli_config(128, 16384)
    assert (cfg["HALVES"], cfg["KP"], cfg["KB"], cfg["LAG"]) == (2, 1, 2, 44)
    for mode, reads in (("forward", 1), ("backward", 2)):
        k = kernels("sap", case, roofline.TRITON, mode)
        assert list(k) == ["_sap_bernoulli_kernel"]
        launch = k["_sap_bernoulli_kernel"]
        assert launch.hbm == (reads + 1) * small + 128 * 8
        assert launch.l2 == small + 128 * 2 * 8
        assert launch.ctas == 128 * 3
        assert launch.lead_us == pytest.approx(44 * 16384 * 4 / (4300.0 * 1e3))
    assert roofline.cuda_sap_cluster_plan(128, 8, 132) == (4, 2)
    assert roofline.cuda_sap_cluster_plan(128, 32, 132) == (4, 8)
    assert roofline.cuda_sap_cluster_plan(8, 32, 132) == (2, 16)
    assert roofline.cuda_sap_cluster_plan(8, 32, 132, esize=8) == (2, 16)
    assert roofline.cuda_sap_cluster_plan(1, 3, 132) == (1, 3)
    assert roofline.cuda_sap_cluster_plan(4, 65, 132) == (0, 0)  # two launches


def test_noise_bytes():
    n = 128 * 64 * 32 * 32 * 4
    case = Case((128, 64, 32, 32), "multiplicative")
    assert kernels("noise", case, roofline.CUDA, "forward")["noise kernel"].hbm == 2 * n
    eager = roofline.plan("noise", case, roofline.EAGER, "forward", "h200")
    assert sum(k.hbm for k in eager.items if isinstance(k, roofline.Kernel)) == 8 * n
    # Additive: the gradient passes through; no launch on any provider.
    additive = Case((128, 64, 32, 32))
    for provider in roofline.PROVIDERS:
        assert kernels("noise", additive, provider, "backward") == {}


def test_cas_bytes():
    case = Case((128, 256, 8, 8))
    n = 128 * 256 * 64 * 4
    small = 10 * 256 * 4 + 128 * (10 * 4 + 256 * 4 + 16)  # weight, logits, means, labels
    forward = kernels("cas", case, roofline.CUDA, "forward")
    # The streaming pass: 8x8 float32 maps are one chunk of 16 lanes x 4 floats (S = 1), a block
    # of 256 threads holds 16 groups x 4 packs = 64 channels: 4 blocks per sample.
    stream = forward["cas_rows_kernel<train>"]
    assert stream.hbm == 2 * n + 128 * 256 * 1 * 4 and stream.ctas == 128 * 4
    logits = forward["cas_logits_kernel<train>"]
    assert logits.hbm == small - 128 * 8 and logits.ctas == 128
    assert "label check: all" not in forward  # an assert inside the streaming kernel
    backward = kernels("cas", case, roofline.CUDA, "backward")
    assert backward["cas_rows_kernel<bwd>"].hbm == 3 * n + 128 * 256 * 2 * 4
    assert backward["cas_rows_kernel<bwd>"].ctas == 128 * 8
    assert kernels("cas", case, roofline.TRITON, "backward")["_cas_backward_kernel"].hbm == 3 * n


def test_masked_conv_bytes_and_flops():
    x = 32 * 128 * 16 * 16 * 4
    weight = 128 * 128 * 9 * 4
    dense_flops = 2 * 32 * 256 * 128 * 128 * 9
    eager = kernels("masked_conv", Case((32, 128, 16, 16), "out25"), roofline.EAGER, "forward")
    assert eager["cuDNN fprop"].flops == dense_flops and eager["cuDNN fprop"].tensor
    assert eager["cuDNN fprop"].hbm == 2 * x + weight
    # Per-sample 25% of 128 output channels (no in_mask: the packed path): x packed into
    # (32, 18, 18, 128) and the weight into (128, 9, 128), then one 32-channel tile of work on
    # tensor cores. Patch tiles inside a sample: 4 output rows of 16 (64 pixels), 4 tiles a
    # sample, 32 x 4 CTAs (no K split: 128 CTAs of 132 SMs are as few rounds as 256); each
    # copies, per 32-channel chunk, a patch of 6 padded rows x 18 (108 pixels, 4 trips of 32 a
    # thread) and runs 9 taps x 4 chunks = 36 steps, each waiting at least a third of an L2
    # round trip (4 stages).
    xp = 32 * 18 * 18 * 128 * 4
    forward = kernels("masked_conv", Case((32, 128, 16, 16), "sample-out25"), roofline.CUDA,
                      "forward")
    packed = "masked_conv2d_tc_packed_kernel (mma, patch tiles)"
    assert list(forward) == ["pack_kernel", packed]
    assert forward["pack_kernel"].hbm == x + xp + 2 * weight
    k = forward[packed]
    assert k.flops == dense_flops / 4 and k.tensor
    assert k.hbm == xp + x + weight and k.ctas == 32 * 4
    lat = roofline.GPUS["h200"]["latency_us"]
    assert k.chain_us >= 36 * lat["l2"] / 3
    # Its issue: the SASS-counted lane instructions of a K step, for every thread of every CTA,
    # and the patch copies once a chunk; its L2 traffic: each CTA's 108-pixel patches of 128
    # channels (the first read of xp from HBM) and its 32 kept weight rows (but the first).
    step = roofline.CUDA_TC_PACKED_STEP_OPS[(32, True)]["float32"]
    setup, trip = roofline.CUDA_PATCH_SETUP_OPS[32]["float32"], roofline.CUDA_PATCH_TRIP_OPS
    assert k.ops == 32 * 4 * 256 * (36 * step + 4 * (setup + 4 * trip))
    assert k.l2 == pytest.approx(128 * 108 * 128 * 4 - xp + 32 * 128 * 9 * 4 * (128 - 1))
    assert k.per_sm == 3  # 80 registers; 18 KiB of stages and two 15.2 KiB patches
    # Its backward's grad_x has the out_mask as its in_mask: the gathering kernel (128 kept
    # rows of the flipped weight, 18 K steps of 64 over the 32 kept input channels x 9 taps... of
    # the sample's mask).
    backward = kernels("masked_conv", Case((32, 128, 16, 16), "sample-out25"), roofline.CUDA,
                       "backward")
    assert "masked_conv2d_tc_kernel (wmma)" in backward and "pack_kernel" not in backward
    # Static 25%: 36 K steps of 32 for one round of CTAs, within the limit (144): the packed
    # path, a quarter of the products, no sync.
    items = roofline.plan("masked_conv", Case((32, 128, 16, 16), "out25"), roofline.CUDA,
                          "forward", "h200").items
    k = {i.name: i for i in items if isinstance(i, roofline.Kernel)}
    assert list(k) == ["pack_kernel", packed]
    assert k[packed].flops == dense_flops / 4
    assert not any(isinstance(i, roofline.Sync) for i in items)
    # Past the limit (128 samples of 56 x 56: 144 steps for each of 8 rounds of CTAs): cuDNN on
    # the kept output channels, with its NCHW transposes as the H200 run measured them (x and
    # the gathered weight to NHWC, the output back), then one pass writes the kept channels
    # with their bias and the zeros; the kept indices cached per mask version (no sync).
    items = roofline.plan("masked_conv", Case((128, 256, 56, 56), "out50"), roofline.CUDA,
                          "forward", "h200").items
    k = {i.name: i for i in items if isinstance(i, roofline.Kernel)}
    assert list(k) == ["index_select weight", "cuDNN: x to NHWC", "cuDNN: weight to KRSC",
                       "cuDNN fprop", "cuDNN: out to NCHW", "scatter_kept_channels_kernel"]
    assert k["cuDNN fprop"].flops == 2 * 128 * 56 * 56 * 128 * 256 * 9
    assert k["cuDNN: weight to KRSC"].hbm == 2 * 128 * 256 * 9 * 4
    assert k["cuDNN fprop"].chain_us >= roofline.CUDNN_FPROP_FIXED_US - 1.5
    assert not any(isinstance(i, roofline.Sync) for i in items)
    # 16 channels: 9 K steps (16 channels padded to 32) for one round of 128 CTAs, within the
    # limit: the packed path (the (C,) mask read on the device), tiles of 4 rows across the
    # batch (no tile crosses a sample: 16 rows a sample); only the kept rows of the weight are
    # reread.
    small = 32 * 16 * 16 * 16 * 4
    items = roofline.plan("masked_conv", Case((32, 16, 16, 16), "out25"), roofline.CUDA,
                          "forward", "h200").items
    k = {i.name: i for i in items if isinstance(i, roofline.Kernel)}
    assert list(k) == ["pack_kernel", packed]
    k = k[packed]
    assert k.ctas == 32 * 4 and k.ops == 32 * 4 * 256 * (9 * step + setup + 4 * trip)
    small_xp = 32 * 18 * 18 * 32 * 4
    assert k.hbm == small_xp + small + 4 * 32 * 9 * 4  # wp: the 4 kept rows alone
    # 108-pixel patches of 32 channels; 4 kept rows of 32 x 9
    assert k.l2 == pytest.approx(128 * 108 * 32 * 4 - small_xp + 4 * 32 * 9 * 4 * (32 * 4 - 1))
    assert not any(isinstance(i, roofline.Sync) for i in items)
    # ResNet's last stage on CIFAR (32 x 512 x 4 x 4, 256 of 512 output channels kept): tiles of
    # 16 rows (4 whole samples, 24 padded rows x 6 = 144 patch pixels), 8 of them x 8 channel
    # tiles = 64 tiles, which leave SMs idle: K split in 2 (a cluster each), 128 CTAs of 72
    # steps; the weight's kept rows are reread by 8 tiles, not by 32 samples.
    # The pack writes the kept weight rows alone (a static out_mask's kept list, cached).
    k = kernels("masked_conv", Case((32, 512, 4, 4), "out50"), roofline.CUDA, "forward")
    split = "masked_conv2d_tc_packed_kernel (mma, patch tiles, K split 2)"
    assert list(k) == ["pack_kernel", split]
    w_kept = 256 * 512 * 9 * 4
    xp4 = 32 * 6 * 6 * 512 * 4
    assert k["pack_kernel"].hbm == 32 * 512 * 16 * 4 + xp4 + 2 * w_kept
    k = k[split]
    assert k.ctas == 128 and k.per_sm == 3
    assert k.chain_us >= 72 * lat["l2"] / 3 + lat["cluster_pass"]
    assert k.l2 == pytest.approx(64 * 144 * 512 * 4 - xp4 + w_kept * 7)
    # Static input mask at 50%: 18 K steps over the 64 kept input channels for one round of 512
    # CTAs (4 an SM, 132 SMs), within the limit: the pack lists the kept
    # channels first (x's kept half read, xp and wp of 64 channels), the kernel runs half the
    # products of the dense convolution.
    k = kernels("masked_conv", Case((32, 128, 16, 16), "in50"), roofline.CUDA, "forward")
    assert list(k) == ["pack_kernel", packed]
    assert k["pack_kernel"].hbm == x / 2 + 32 * 18 * 18 * 64 * 4 + weight
    conv = k[packed]
    assert conv.flops == dense_flops / 2 and conv.ctas == 512
    assert conv.ops == 512 * 256 * (18 * step + 2 * (setup + 4 * trip))
    # 75% kept: 27 steps over 96 channels, still within the limit: packed, with three quarters
    # of the products; and so is a static out_mask at 75% (36 steps).
    k = kernels("masked_conv", Case((32, 128, 16, 16), "in75"), roofline.CUDA, "forward")
    assert list(k) == ["pack_kernel", packed]
    assert k[packed].flops == dense_flops * 3 / 4
    k = kernels("masked_conv", Case((32, 128, 16, 16), "out75"), roofline.CUDA, "forward")
    assert list(k) == ["pack_kernel", packed]
    assert k[packed].flops == dense_flops * 3 / 4


def test_triton_patch_pixels_counts_each_tiles_xp_pixels_once():
    """The packed Triton convolution's L2 reads of x: a tile's patch of xp (3x3, padding 1),
    each padded pixel once a tile, against a direct count over the taps' pixel sets."""
    # One 8x8 sample a 64-pixel tile: its 10x10 padded map. Four 4x4 samples a tile: 4 x 6x6.
    # Four rows of a 16x16 map: 6 padded rows of 18.
    assert roofline.triton_patch_pixels(1, 64, 8, 64) == 100
    assert roofline.triton_patch_pixels(1, 4 * 16, 4, 64) == 4 * 36
    assert roofline.triton_patch_pixels(3, 256, 16, 64) == 3 * 4 * 6 * 18
    for ranges, n, side, block_p in ((1, 5, 7, 64), (2, 1, 14, 32), (1, 3, 9, 128)):
        span = n * side * side
        padded = side + 2
        total = 0
        for start in range(0, span, block_p):
            touched = set()
            for p in range(start, min(start + block_p, span)):
                s, q = divmod(p, side * side)
                oh, ow = divmod(q, side)
                touched |= {(s, oh + kh, ow + kw) for kh in range(3) for kw in range(3)}
            total += len(touched)
        assert roofline.triton_patch_pixels(ranges, span, side, block_p) == ranges * total


def test_written_out_cuda_constants_match_the_sources():
    """The model's copies of CUDA launch constants are the sources' values (read from the
    sources: no GPU or CUDA build needed)."""
    import re

    csrc = harness.RESULTS.parent.parent / "csrc" / "cuda"

    def constant(source: str, name: str) -> int:
        found = re.findall(rf"constexpr\s+\w+\s+{name}\s*=\s*(\d+)\s*;",
                           (csrc / source).read_text())
        assert len(found) == 1, (source, name, found)
        return int(found[0])

    assert roofline.CUDA_STATIC_PACKED_MAX_STEPS == constant("masked_conv.cu",
                                                             "kStaticPackedMaxSteps")
    assert roofline.CUDA_PATCH_MAX_SMEM == constant("masked_conv.cu", "kPatchMaxSmem")
    assert roofline.CUDA_PATCH_PER_SM == constant("masked_conv.cu", "kPatchMinBlocks")
    assert roofline.CUDA_PACKED_MAX_SPLIT == constant("masked_conv.cu", "kMaxSplit")
    assert roofline.CUDA_PACKED_STAGES == constant("masked_conv.cu", "kPkStages")
    assert roofline.CUDA_KWTA_MIN_CLUSTER_SLICE == constant("kwta.cu", "kMinClusterSlice")
    assert roofline.CUDA_KWTA_MAX_CLUSTER == constant("kwta.cu", "kMaxCluster")
    assert roofline.CUDA_SAP_WHOLE_CHUNK_RATIO == constant("sap.cu", "kWholeChunkRatio")
    assert roofline.CUDA_SAP_STORE_MAX_RATIO == constant("sap.cu", "kStoreMaxRatio")
    assert roofline.CUDA_SAP_OWN_TOTAL == constant("sap.cu", "kBernoulliOwnTotal")
    assert roofline.CUDA_SAP_CLUSTER_BLOCKS == constant("sap.cu", "kClusterMaxBlocks")
    assert max(roofline.CUDA_SAP_BLOCK_CHUNKS) == constant("sap.cu", "kClusterMaxChunksPerBlock")
    assert roofline.CUDA_SAP_CHUNK == constant("sap.cu", "kThreads") * 8


@pytest.mark.triton
def test_written_out_triton_configs_match_the_launchers():
    """The model writes the Triton launch configurations out instead of importing them; each
    must still be what the launcher picks, over the benchmarks' sizes and around the
    thresholds."""
    from pyprune.triton_kernels import kwta, sap

    for length in (1, 37, 253, 254, 1000, 1021, 1022, 1024, 1025, 4096, 4097, 5000, 8191, 8192, 16383, 16384, 16385, 65536, 802816, 10**6):
        for draws in (1, 255, length, 2**24):
            cfg = roofline.triton_sap_config(length, draws)
            assert (cfg["E"], cfg["D"]) == sap._chunk_sizes(length, draws), (length, draws)
            assert cfg["DT"] == sap._DT
            assert cfg["SLOTS"] == sap._SLOTS and cfg["warps"] == sap._WARPS
            assert cfg["STORE_MAX_RATIO"] == sap._STORE_MAX_RATIO
        for rows in (1, 8, 16, 33, 128, 132, 1000):
            assert (roofline.triton_sap_bernoulli_config(rows, length)
                    == sap.bernoulli_config(rows, length)), (rows, length)
        assert roofline.triton_kwta_in_registers(length) == kwta._in_registers(length), length
        if kwta._in_registers(length):
            assert roofline.triton_kwta_config(length) == kwta._forward_config(length)
        for groups in (1, 8, 32, 128):
            sample, _, sample_warps, block, warps = kwta._split_config(groups, length)
            assert roofline.triton_kwta_split_config(groups, length) == (
                sample, sample_warps, block, warps), (groups, length)
    from pyprune.triton_kernels import masked_conv

    for c_out, pixels, n, out_masked, sparse, packed in itertools.product(
            (16, 64, 128, 256, 512), (16, 64, 196, 256, 1024, 8192), (1, 32), (False, True),
            (False, True), (False, True)):
        if sparse and (out_masked or packed):
            continue
        bp, bco, bci = masked_conv._blocks(c_out, pixels, n, out_masked, sparse)
        assert roofline.triton_conv_config(c_out, pixels, n, out_masked, sparse, packed) == (
            bp, bco, bci, masked_conv._num_warps(bp, bco, bci, 90, packed))
    # A weight mask's launch: the dense tiles it carries, and the share that picks them.
    for block_p in masked_conv._BLOCK_PS:
        dense = masked_conv._gated_dense_tile(block_p)
        assert roofline.triton_gated_dense_tile(block_p) == dense
        assert (dense is None) == (block_p < masked_conv._GATED_MIN_P)
        if dense:  # at the block-sparse tiles' warps, a tile every architecture takes
            assert masked_conv._num_warps(*dense, 32, 90, True) == masked_conv._num_warps(
                block_p, 16, 16, 90, True) == 4
            assert all((*dense, 32, False) in masked_conv._configs(a) for a in (80, 90))
    assert roofline.TRITON_SPARSE_MAX_SHARE == masked_conv._SPARSE_MAX_SHARE
    assert roofline.TRITON_KWTA_MAX_BLOCK == kwta._FWD_MAX_BLOCK
    assert roofline.TRITON_KWTA_MAX_MASKED == kwta._FWD_MAX_MASKED
    assert roofline.TRITON_KWTA_SAMPLE == (kwta._SAMPLE_MIN, kwta._SAMPLE)
    assert (roofline.TRITON_KWTA_CAND_MIN, roofline.TRITON_KWTA_BAND_BINS,
            roofline.TRITON_KWTA_BIN_CAP, roofline.TRITON_KWTA_TAIL) == (
        kwta._CAND_MIN, kwta._BAND_BINS, kwta._BIN_CAP, kwta._TAIL)
    assert (roofline.TRITON_KWTA_FINISH_WARPS, roofline.TRITON_KWTA_FINISH_REGS) == (
        kwta._FINISH_WARPS, kwta._FINISH_MAX_REGS)
    from pyprune.triton_kernels import cas

    assert (roofline.TRITON_CAS_FUSED_MAX_STEP, roofline.TRITON_CAS_FUSED_MAX_STEPS,
            roofline.TRITON_CAS_GATHER_S) == (cas._FUSED_MAX_STEP, cas._FUSED_MAX_STEPS,
                                              cas._GATHER_S)
    for block_k, warps in itertools.product((1, 4, 8, 64, 128, 256, 2048), (2, 4, 8)):
        assert roofline.triton_cas_fused_step(block_k, warps) == cas._fused_step(block_k, warps)
    assert roofline.TRITON_CAS_FUSED_CLASSES == cas._FUSED_CLASSES
    for classes in (1, 10, 16, 17, 64, 65, 1000):
        for block_k, block_l in ((1, 512), (8, 256), (64, 16), (2048, 1)):
            for warps in (None, 2, 132 * 16, 132 * 16 + 1):
                assert (roofline.triton_cas_tail(block_k, block_l, classes, warps)
                        == tuple(cas._tail_config(block_k, block_l, classes, warps).values()))
    for rows, channels, length, classes in itertools.product((1, 128), (3, 64, 2048),
                                                             (1, 49, 1024), (10, 64, 65, 1000)):
        block_k, block_l, warps, logits = roofline.triton_cas_config(rows, channels, length,
                                                                     classes)
        assert (block_k, block_l, warps) == cas._stream_config(rows, channels, length, False)
        s = cas._stream_grid(rows, channels, length, block_k, block_l)[2]
        assert logits == (cas._logits_config(channels, classes, s) if classes > 64 else None)


def test_bucket_share():
    """The candidates left after the top 11 bits of the 90th percentile of N(0, 1): the values
    with its exponent and top 2 mantissa bits, [1.25, 1.5)."""
    from statistics import NormalDist

    share = roofline.bucket_share(0.9, 11)
    assert share == pytest.approx(NormalDist().cdf(1.5) - NormalDist().cdf(1.25), rel=1e-6)


def test_host_time_hides_behind_the_flush_until_a_sync():
    gpu = roofline.GPUS["h200"]
    busy = roofline.Kernel("k", host_us=4.0, hbm=43e6)  # 10 us of traffic
    quick = [roofline.Host(30.0), busy]
    synced = [roofline.Host(30.0), roofline.Sync(10.0), busy]
    [t] = roofline.simulate([quick], gpu, "float32")
    assert t == pytest.approx(10.0 + gpu["kernel_us"])
    [t] = roofline.simulate([synced], gpu, "float32")
    assert t > 20.0  # the host issues the launch only after the flush drained


def test_a_call_is_timed_alone():
    """The harness synchronises before each run, so a provider's time does not depend on the
    providers timed beside it: a device-heavy call before a host-heavy one hides none of the
    latter's host time."""
    gpu = roofline.GPUS["h100"]
    heavy = [roofline.Kernel("k", host_us=4.0, hbm=3e9)]  # ~1 ms of traffic
    hosty = [roofline.Host(400.0), roofline.Kernel("k", host_us=4.0, hbm=3e6)]
    [alone] = roofline.simulate([hosty], gpu, "float32")
    assert alone > 300.0  # 400 us of host, less the flush's head start
    assert roofline.simulate([heavy, hosty], gpu, "float32")[1] == alone


def _measured_kwta(folder) -> Case:
    """A kwta CSV in folder: eager 200 us and pyprune-cuda 50 us on an H200; returns the case."""
    case = OPS["kwta"].CASES[1]
    rows = [harness.Row(op="kwta", provider=p, mode="forward", shape=case.label, dtype="float32",
                        p20_ms=0.1, p50_ms=ms, p80_ms=0.1, gbps=1000.0, peak_mb=1.0,
                        device="NVIDIA H200", torch="2.11", version="0", date="d")
            for p, ms in (("eager", 0.2), ("pyprune-cuda", 0.05))]
    harness.write_csv(folder / "kwta.csv", rows)
    return case


def test_compare_prints_measured_beside_predicted(tmp_path, capsys):
    _measured_kwta(tmp_path)
    assert roofline.compare(tmp_path, None) == 0
    out = capsys.readouterr().out
    assert "h200" in out and "4.00x" in out and "meas/pred" in out


def _host_costs(path, **figures) -> dict[str, float]:
    """A host_overhead --launches CSV at path with figures (name -> us); returns them."""
    harness.write_table(path, ("name", "host_us_per_call", "device", "torch", "date"),
                        [(name, us, "cuda", "2.11", "d") for name, us in figures.items()])
    return figures


def test_host_figures_take_the_measured_costs_and_scale_the_rest(tmp_path):
    """Measured aten, triton and counters replace the model's; harness_before and
    harness_after share the measured harness as the model splits it; every other figure
    (dicts included) scales by measured aten / the model's; scale multiplies all of them."""
    base = roofline.GPUS["h200"]["host_us"]
    _host_costs(tmp_path / "c.csv", aten=3 * base["aten"], triton=55.0, counters=4.0,
                harness=36.0)
    costs = roofline.read_host_costs(tmp_path / "c.csv")
    assert costs == {"aten": 3 * base["aten"], "triton": 55.0, "counters": 4.0, "harness": 36.0}
    figures = roofline.host_figures("h200", 1.0, costs)
    assert (figures["aten"], figures["triton"], figures["counters"]) == (3 * base["aten"], 55.0,
                                                                         4.0)
    assert figures["harness_before"] + figures["harness_after"] == pytest.approx(36.0)
    assert figures["harness_before"] / figures["harness_after"] == pytest.approx(
        base["harness_before"] / base["harness_after"])
    assert figures["inner"] == pytest.approx(3 * base["inner"])
    assert figures["pyprune_forward"]["cas"] == pytest.approx(3 * base["pyprune_forward"]["cas"])
    doubled = roofline.host_figures("h200", 2.0, costs)
    assert doubled["triton"] == 110.0 and doubled["sync"] == pytest.approx(6 * base["sync"])
    plain = roofline.host_figures("h200", 2.0)
    assert plain["aten"] == 2 * base["aten"]
    assert plain["pyprune_backward"]["masked_conv"] == 2 * base["pyprune_backward"]["masked_conv"]
    with pytest.raises(ValueError, match="scale"):
        roofline.host_figures("h200", 0.0)
    with pytest.raises(ValueError, match="aten"):
        roofline.host_figures("h200", 1.0, {"triton": 1.0})


def test_a_slower_host_moves_host_bound_calls_only():
    """Inside host_speed the predictions take the scaled figures, and GPUS is restored after:
    Triton noise at 8x64x32x32 (host-bound once its host outgrows the flush) slows with the
    host; CUDA noise at 32x256x56x56 (~100 us of traffic) does not at x2."""
    small, large = (next(c for c in OPS["noise"].CASES if c.label == label)
                    for label in ("8x64x32x32", "32x256x56x56"))
    before = roofline.GPUS["h200"]
    t_small = roofline.predict("noise", small, "pyprune-triton", "forward", "h200").predicted_us
    t_large = roofline.predict("noise", large, "pyprune-cuda", "forward", "h200").predicted_us
    with roofline.host_speed("h200", 4.0) as figures:
        assert figures["aten"] == 4 * before["host_us"]["aten"]
        slow = roofline.predict("noise", small, "pyprune-triton", "forward", "h200")
        assert slow.bound == "host" and slow.predicted_us > t_small + 20
    with roofline.host_speed("h200", 2.0):
        assert roofline.predict("noise", large, "pyprune-cuda", "forward",
                                "h200").predicted_us == pytest.approx(t_large)
    assert roofline.GPUS["h200"] is before
    assert roofline.predict("noise", small, "pyprune-triton", "forward",
                            "h200").predicted_us == t_small


def test_compare_takes_the_runs_host_costs(tmp_path, capsys):
    """A run folder's host_costs.csv sets the host figures of the predictions beside it."""
    case = _measured_kwta(tmp_path)
    base_aten = roofline.GPUS["h200"]["host_us"]["aten"]
    assert roofline.compare(tmp_path, None) == 0
    plain = capsys.readouterr().out
    assert "host figures" not in plain
    costs = _host_costs(tmp_path / "host_costs.csv", aten=8 * base_aten, harness=200.0,
                        triton=120.0, counters=10.0)
    assert roofline.compare(tmp_path, None) == 0
    out = capsys.readouterr().out
    assert "host_costs.csv: aten" in out and "8.00x the dev VM's" in out
    with roofline.host_speed("h200", 1.0, costs):
        slow = roofline.predict("kwta", case, "pyprune-cuda", "forward", "h200").predicted_us
    [line] = [ln for ln in out.splitlines() if ln.startswith("kwta") and "pyprune-cuda" in ln]
    assert float(line.split()[5]) == pytest.approx(slow, abs=0.05)
    assert slow > roofline.predict("kwta", case, "pyprune-cuda", "forward", "h200").predicted_us


def test_compare_shows_the_gpu_busy_time_of_kernel_times(tmp_path, capsys):
    from benchmarks import kernel_times

    case = _measured_kwta(tmp_path)
    harness.write_table(tmp_path / "kernel_times.csv", kernel_times.COLUMNS, [
        ("kwta", case.label, "forward", "pyprune-cuda", kernel_times.ALL, 1.0, 12.5, 40.0),
        ("kwta", case.label, "forward", "pyprune-cuda", "kwta_block_kernel", 1.0, 12.5, 40.0),
        ("kwta", case.label, "forward", "eager", kernel_times.ALL, 9.0, 50.0, 90.0)])
    assert roofline.compare(tmp_path, None) == 0
    out = capsys.readouterr().out
    assert "busy us" in out
    [line] = [ln for ln in out.splitlines() if "pyprune-cuda" in ln]
    # Busy time, its ratio to the model's device time, and eager's busy time over it.
    device_us = roofline.predict_case("kwta", case, "forward", "h200")["pyprune-cuda"].device_us
    busy, ratio, vs_eager = line.split("|")[1].split()
    assert busy == "12.5" and float(ratio) == pytest.approx(12.5 / device_us, abs=0.01)
    assert vs_eager == "4.00x"
    assert "busy / predicted device time: median" in out


@pytest.mark.parametrize("gpu", sorted(roofline.GPUS))
def test_committed_predictions_are_current(gpu):
    """benchmarks/results/<gpu>-predicted.csv is what the model predicts now (regenerate with
    python -m benchmarks.roofline --gpu <gpu>)."""
    path = harness.RESULTS / f"{gpu}-predicted.csv"
    with path.open(newline="") as f:
        committed = {(r["op"], r["case"], r["mode"], r["provider"]): r for r in csv.DictReader(f)}
    now = {(r["op"], r["case"], r["mode"], r["provider"]): r
           for r in roofline.rows(gpu, with_declared=False)}
    assert committed.keys() == now.keys()
    for key, row in now.items():
        for column in ("bytes", "flops", "launches", "predicted_us", "predicted_eager_us",
                       "predicted_compile_us"):
            assert float(committed[key][column]) == pytest.approx(float(row[column]), rel=1e-5), \
                (key, column)


def test_readme_prediction_table_is_current():
    """README.md's GPU prediction table is the one the committed predicted CSVs give (rewrite it
    with python -m benchmarks.readme_table --predicted README.md)."""
    from benchmarks import readme_table

    readme = (harness.RESULTS.parent.parent / "README.md").read_text()
    begin, end = readme_table.PREDICTED_BEGIN, readme_table.PREDICTED_END
    assert begin in readme and end in readme
    shown = readme.split(begin, 1)[1].split(end, 1)[0].strip()
    assert shown == readme_table.predicted_table(harness.RESULTS).strip()
    assert "| kwta | 8x64x32x32 | forward | >= 5x eager |" in shown  # one row per goal case


def test_event_floor_marks_only_unreachable_copy_goals():
    """floor_pct_copy is the share of the copy bandwidth a call at the harness's event floor
    shows; the README table marks a missed "% of copy" goal only where even that is below the
    goal (8x64x32x32: 4 MB in 3 us on an H100 is 47% of 3000 GB/s), and explains the mark."""
    from benchmarks import readme_table

    mb4 = 8 * 64 * 32 * 32 * 4 * 2
    floor = roofline.GPUS["h100"]["event_floor_us"]
    assert roofline.floor_pct_copy("h100", mb4) == pytest.approx(
        100 * mb4 / (floor * 1e3) / roofline.GPUS["h100"]["copy_gbps"])
    assert roofline.floor_pct_copy("h100", mb4) < 70 < roofline.floor_pct_copy("h100", 16 * mb4)
    row = {"gpu": "h100", "goal": ">= 70% of copy", "declared_bytes": str(mb4),
           "predicted_pct_copy": "40.0", "meets_goal": "no"}
    assert readme_table._predicted_cell(row) == f"40% {readme_table.FLOOR_MARK}"
    big = {**row, "declared_bytes": str(16 * mb4)}
    assert readme_table._predicted_cell(big) == "40%"
    assert readme_table._predicted_cell({**row, "goal": ">= 5x eager",
                                         "predicted_speedup_vs_eager": "4.0"}) == "4.00x"
    lines = readme_table.predicted_table(harness.RESULTS).splitlines()
    marked = [line for line in lines if line.startswith("|") and readme_table.FLOOR_MARK in line]
    assert bool(marked) == lines[-1].startswith(readme_table.FLOOR_MARK)  # the footnote


def test_count_select_is_the_kernels_select():
    """The roofline counts the Triton k-WTA select's passes by running its loop
    (count_select): that loop finds the k-th largest key, on spread-out keys, ties and a
    single value, in at most 32 passes, and few for spread-out data."""
    import random

    rng = random.Random(1)
    groups = [[rng.getrandbits(32) for _ in range(500)],
              [rng.choice([7, 7, 9, 2**31, 2**32 - 1]) for _ in range(300)],
              [5] * 40]
    for keys in groups:
        for k in sorted({1, 2, len(keys) // 3, len(keys) - 1, len(keys)}):
            key, passes = roofline.count_select(keys, k)
            assert key == sorted(keys)[-k], (k, key)
            assert passes <= 32
    assert roofline.count_select(groups[0], 50)[1] <= 16
    assert 10 < roofline.kwta_count_passes(1024, 102) < 20


@pytest.mark.parametrize("op, tolerance", [("kwta", 0.15), ("sap", 0.15), ("masked_conv", 0.2)])
def test_eager_model_matches_the_h200_run(op, tolerance):
    """The eager models' kernel rates of k-WTA (roofline.TOPK_*), SAP (MULTINOMIAL_*, SCATTER_*,
    BROADCAST_BW) and cuDNN's float32 convolution (CUDNN_*) were read off the H200 run's kernel
    times: their device time stays within 15% (20% for the convolutions) of that run's busy
    time in every forward case it measured."""
    path = pathlib.Path(__file__).parents[1] / "benchmarks/results/nvidia-h200/kernel_times.csv"
    with open(path) as f:
        busy = {r["shape"]: float(r["device_us_per_call"]) for r in csv.DictReader(f)
                if r["op"] == op and r["mode"] == "forward" and r["provider"] == "eager"
                and r["kernel"] == "(all)"}
    cases = [case for case in OPS[op].CASES if case.label in busy]
    assert len(cases) >= 6
    for case in cases:
        predicted = roofline.predict_case(op, case, "forward", "h200")["eager"].device_us
        assert predicted == pytest.approx(busy[case.label], rel=tolerance), case.label


def test_batch_sweep_covers_every_batch_and_matches_the_cases():
    """--batches predicts every case at each sweep batch size for both pyprune providers; at a
    case's own batch size the row is the case's prediction; the fill is the fewest CTAs of the
    call's launches over the SMs."""
    table = roofline.batch_sweep("h200", ["kwta", "cas"])
    cases = {(op, c.label): c for op in ("kwta", "cas") for c in harness.discover_ops()[op].CASES}
    assert {(r["op"], r["case"]) for r in table} == set(cases)
    for key, case in cases.items():
        for provider in (roofline.CUDA, roofline.TRITON):
            rows = [r for r in table if (r["op"], r["case"]) == key and r["provider"] == provider]
            assert [r["batch"] for r in rows] == list(roofline.SWEEP_BATCHES)
            own = next(r for r in rows if r["batch"] == case.shape[0]) if (
                case.shape[0] in roofline.SWEEP_BATCHES) else None
            if own is not None:
                pr = roofline.predict(key[0], case, provider, "forward", "h200")
                assert own["predicted_us"] == pytest.approx(pr.predicted_us)
                eager = roofline.predict(key[0], case, roofline.EAGER, "forward", "h200")
                assert own["vs_eager"] == pytest.approx(eager.predicted_us / pr.predicted_us)
    one = next(r for r in table if r["op"] == "kwta" and r["case"] == "128x64x32x32"
               and r["batch"] == 1 and r["provider"] == roofline.TRITON)
    # One sample of 65536 elements: one sample program, 64 filter chunks of 1024, one finish.
    assert one["fewest"] == "_kwta_sample_kernel" and one["fill"] == pytest.approx(1 / 132)
