"""``python -m benchmarks.roofline --gpu h100|h200 [--out CSV]`` and ``--compare DIR``
(``--host-scale S``, ``--host-costs CSV``: other host figures, see below; ``--batches [OP
...]``: every case at batch sizes 1 to 256; ``--explain OP CASE MODE PROVIDER``).

A roofline model of every case ``python -m benchmarks --device cuda`` measures (each op's
``CASES``, every mode, providers eager, torch.compile, pyprune-cuda and pyprune-triton), written
to ``benchmarks/results/<gpu>-predicted.csv``; ``--compare benchmarks/results/<gpu dir>`` prints
the measured p50 of such a run beside the prediction. Nothing here runs a kernel: each provider's
call is written down as the sequence of launches its code makes (read from csrc/cuda,
triton_kernels and the eager PyTorch it is compared with), each launch with the bytes it moves,
the work it does and what limits its parallelism. ``end_to_end`` is not modelled: it is a CPU
benchmark and not part of ``python -m benchmarks``.

Per launch (``Kernel``), on one GPU's constants (``GPUS``):

    device_us = max(hbm / copy_bandwidth,          bytes to and from HBM
                    l2 / l2_bandwidth,             rereads that stay in L2 (see below)
                    ops / (issue_rate * eff * f),  CUDA-core lane instructions (FMA = 1 = 2 FLOPs)
                    flops / (tensor_rate * eff * f),  tensor-core FLOPs (TF32 for float32)
                    waves * chain_us)              serial latency of one CTA
                + kernel_us                        launch latency, ramp and tail on the device

* copy_bandwidth is the measured device-to-device copy (read + write), the rate a well-written
  streaming kernel reaches, not the HBM peak.
* f = min(CTAs, SMs) / SMs: a kernel with fewer CTAs than SMs (one block per sample at batch
  < 132) computes on that share of the GPU only. waves = ceil(CTAs / (SMs * CTAs per SM)).
* chain_us: a CTA that loops over its sample with a dependent memory round trip per step
  (a load whose value is stored before the next load issues, a block scan between loads, a
  Triton ``while`` loop, which is not software-pipelined) cannot go faster than steps x latency,
  whatever the bandwidth. The op models count those steps from the loops of the kernels
  (``latency_us`` holds the latency of each kind of step).
* A reread (a second pass over a tensor inside one launch) is served by L2 when the working set
  of the resident CTAs fits in ``l2_reuse`` of the L2; otherwise it is HBM traffic again.

Per call: the harness (harness._cuda_times) times the providers of a case and mode
interleaved, run after run; each run waits for the device, zeroes a 256 MiB buffer (L2 flush,
~60-90 us of device time), records the start event, calls, records the end event. The host
issues the call while the device is still zeroing, so the call's host time is hidden up to that
head start and shows beyond it, or after a synchronisation (``Sync``: nonzero()), which drains
the lead. ``simulate`` replays a run: the host issues each launch after its host cost
(``host_us``: an aten op
from Python or from C++, a Triton launch, a cuDNN call, the Python of a pyprune call forward and
backward, torch.compile's wrappers, measured on the dev VM's CPU with tiny tensors), the device
runs it when both it and the stream are ready, and a run's time is its end event minus its start
event. So ``predicted_us`` is the device time (the sum of ``device_us``,
``launches * kernel_us`` being the launch term) where the host keeps ahead, and more where it
does not (``bound`` = host). The host figures are the dev VM's; ``host_figures`` gives them for
another host: measured on the GPU machine (``host_overhead --launches``, host_costs.csv, which
``--compare`` takes from the run's folder), or all scaled (``--host-scale``: how many goals
hold with a slower host; README's prediction table states the count at x2).

CSV columns: gpu, op, case (the benchmark CSV's shape), mode, provider, dtype; bytes (HBM),
l2_bytes, flops, ops (CUDA-core instructions besides FLOPs), launches and syncs of the call;
lower_bound_us; device_us (sum over its launches); predicted_us; predicted_eager_us and
predicted_compile_us of the same case and mode, and the speed-ups over them; declared_bytes (the
benchmark's GB/s numerator) and predicted_pct_copy (of the copy bandwidth), forward rows only;
bound (hbm, l2, issue, tensor, latency, launch, host: what limits the call); goal and
meets_goal (yes / no) where a goal applies.

The lower bound (``lower_bound_us``) is compulsory traffic at copy bandwidth (inputs read once,
outputs written once: ``compulsory``), or for convolutions the kept FLOPs at the dense
tensor-core peak, whichever is larger, with no launch cost.

Goals (``goal``): ../shared/SPEC.md section 7 and issue 20, forward mode unless stated:
kwta >= 3x eager (>= 5x at batch <= 32), sap exact >= 5x eager, sap bernoulli and noise >= 70%
of copy bandwidth (the harness's GB/s: its declared bytes / time), cas full >= 1.3x
torch.compile, static channel masks (out*, in*) >= 80% of the FLOP-ratio ideal vs eager,
sample-out25 >= 2x eager (dense conv times the mask); for the cuda and triton backends.

Per op, the passes modelled (n = bytes of x; k = kept share; see each ``*_forward`` /
``*_backward`` for the counts):

kwta (csrc/cuda/kwta.cu, triton_kernels/kwta.py)
  cuda fwd     L <= 1024: warp select (32 keys a lane, bit-transposed planes), x read once, the
               write pass rereads it (L2): 2n HBM + n L2, ~45 ops/elem. L > 1024: a block (or an
               sm_90 cluster of 2-16 blocks) per group, all groups at once, 3 radix passes of
               11 bits; pass 1 reads
               x, pass 2 reads x again unless the candidates fit in shared memory (24 KiB; the
               share left after a digit is the N(0,1) mass of that digit's bucket at the
               threshold), later passes read shared memory; the masked write reads x and writes
               out: 3 reads + 1 write for every case here (from L2 where x fits in half
               of it, else from DRAM). A CTA's chain: each global pass
               in trips of 16 elements a thread (a round trip, then the SM's issue of 21-29
               SASS instructions an element: CUDA_KWTA_BLOCK_OPS), 4.3 us a pass and 0.24 us
               a cluster-merge round trip (fitted to the H200 run: CUDA_KWTA_PASS_US).
  cuda bwd     one elementwise pass: grad + x read, grad_x written: 3n.
  triton fwd   L <= 8192: one program per group, x in registers (32 keys a thread), a
               counting select of one bit a pass (~4 SASS instructions a key a pass, ~15
               passes for 1024 N(0, 1) values: kwta_count_passes runs the loop) and ~37 more
               a key: 2n. Else three launches
               (kwta._split_forward): sample (one program a group, L/64 values within [1024,
               4096], 3 joint passes for both bracket ends), filter (groups * L / chunk
               programs, chunk 2048 or 1024: x read once, out written once, the band's values
               and positions appended and counted in 1024 bins by relaxed atomics), finish (a
               program a group: picks the threshold's bin, scans the candidates, selects within
               the bin in registers and stores the band's kept values, a sector each): 2n +
               candidates + the kept band's sectors.
  triton bwd   as cuda: 3n.
  eager        torch.topk (multi-block radix select: 4 digit passes + gather = 5 reads, plus
               the sorted=True sort of the k results, in place for k <= 4096, else at::sort),
               x >= thr (n + n/4 bool), x * mask (n + n/4 + n); backward grad * mask: 2n + n/4.
               Rates and fixed times of those kernels as the H200 run measured them (TOPK_*:
               the digit passes at 45% of the copy rate, the gather at 22%, the sort's).
  compile      topk as eager, one fused ge*mul kernel 2n; backward grad * (x >= thr): 3n.
sap (csrc/cuda/sap.cu, triton_kernels/sap.py); r = L draws, x after a ReLU
  cuda         a seed drawn on the host (no launch), then three launches over many
               blocks per sample: partials (|x| sums of 2048-element chunks in 16-byte packs;
               exact: the spacing sums of 1024-draw chunks, one Philox per 4 draws), the
               per-sample prefix sums (one thread per sequence, fixed order; bernoulli with
               at most 64 chunks a sample: none, each block's thread 0 adds them), then exact: a
               merge block per element chunk (the positions of the draw chunks reaching its
               range read back where r <= 4 L, else made again; where r >= 2 L a draw chunk
               inside one element flagged without either; a search in shared memory per draw);
               bernoulli: one elementwise pass (one Philox per 4
               elements, q by series). Bytes: 3n forward (x twice: from L2 where x fits),
               4n backward; issue-bound (Philox and q per element) at large batch.
               Bernoulli samples of at most 8 chunks (L % 4 == 0): one launch, a cluster of
               blocks a sample holding it in registers, partials summed over DSMEM: 2n
               forward, 3n backward.
  triton       the host seed, then a sample over many programs: partials (sum |x| per chunk
               of E = 256 or 1024 elements, in exact mode the spacings per draw chunk: one Philox per 4
               draws; where r <= 4 L also their running sums), exact: per-sample prefix sums
               by the sample's last partials program (same launch, counted with atomics),
               then a merge over (sample, element chunk) in 1056 persistent programs (the
               reaching draw chunks' running sums read back, or made again where r > 4 L; a
               binary search per draw over the chunk's bounds in an L1-resident scratch slot);
               bernoulli: one elementwise pass (one Philox per 4 elements, q by series,
               ~95 ops an element). Bytes:
               3n forward (x twice, from L2 where all of x fits), 4n backward, exact with the
               draws' sums written and read back; exact is issue-bound (~200 ops an element in
               the merge, ~80 a draw in the partials) or latency-bound at small batch.
  eager        abs, sum, div, torch.multinomial (copy, copy, renorm, cumsum, the draws: 8-byte
               indices and ~4 L2 sectors of binary search per draw), zeros + scatter_,
               q = -expm1(r * log1p(-p)) (5 kernels), x / q, where: ~34n in ~20 launches;
               backward where + div: 5n + n/4.
  compile      sum, p, multinomial as eager, fill + scatter, one fused where/div/q pass.
noise (csrc/cuda/noise.cu, triton_kernels/noise.py)
  cuda         host seed + one pass (2n), one Philox per 4 elements, 16-byte (float) /
               8-byte (half) vectors, lg2/sqrt/sin/cos approximations: ~33 ops/elem (SASS), so issue-bound
               only where the copy rate exceeds ~5 TB/s at 8 bytes an element.
  triton       host seed + one pass (2n), one Philox per 4 elements (_random.normal4), (512, 4)
               tiles, int32 offsets, log1p and cos / sin by polynomials: ~39 ops/elem (sm_90
               SASS of the unit-stride variant).
  eager        randn_like (n), std * noise (2n), x + (2n) [x * (1 + ...): 8n];
               backward additive: no kernel; multiplicative grad * (1 + std n): 3n.
  compile      inductor's seed kernel + one fused pass with tl.randn (~150 ops/elem); the
               multiplicative forward also stores the noise for backward (3n).
cas (csrc/cuda/cas.cu, triton_kernels/cas.py); training mode (labels)
  both         each sample split over many blocks / programs: a streaming pass (x -> out
               and per-(sample, channel, chunk) partial sums, 2n; one DRAM round trip a block),
               then a logits launch that combines the partials in a fixed order (the weight
               read per sample or block of samples, from L2). Backward: a = grad_logits @
               weight, one streaming pass grad + x -> grad_x and the partial sums of grad * x
               (3n), grad_weight's class sums gathered in sample order (no atomics).
  triton       labels flagged by the kernels, one _assert_async; tiles of 512-2048 elements
               (triton_cas_config); up to 64 classes each sample's last streaming program
               forms its logits (its count kept zero between launches), else a logits launch per 16
               samples x 16 classes; grad_weight = grad_logits.T @ mean in the gather kernel.
  eager        mean (n), addmm, index, x * m (2n); backward ~10n in ~13 launches.
  compile      one fused pass (means + out, 2n) and the logits GEMM; backward one fused pass
               (3n) and the small GEMMs.
masked_conv (csrc/cuda/masked_conv.cu, csrc/masked_conv.h, triton_kernels/masked_conv.py)
  cuda         dense: F.conv2d (cuDNN, TF32) + bias add. Static out masks: the kept weight
               rows gathered, cuDNN on them without bias, one scatter kernel writing the whole
               output (kept channels + bias, zeros elsewhere): 3 launches (5 with an in mask;
               indices cached per mask version: no nonzero() after the first call). Static in
               masks alone: the x and weight gathers around cuDNN. Per-sample masks: the
               implicit-GEMM kernel on tensor cores (wmma: TF32 for float32 where allowed,
               bf16/fp16), 64 kept output channels x 32 pixels a block: ceil(kept/64)*64
               channels of work. Static masks where the packed kernel's rounds of CTAs x K
               steps of 32 stay within 144 (every static benchmark case): the pack and that
               kernel alone. Weight masks: the masked weight (3 bit ops) in a dense cuDNN
               conv. cuDNN's float32 forward at the H200 run's times (CUDNN_*: ~12 us a
               convolution before its FLOPs, x and the weight transposed to NHWC first and
               the output back to NCHW).
  triton       tl.dot on tensor cores (float32: TF32, cudnn.allow_tf32 being PyTorch's default),
               tiles of 16-128 pixels x 16-128 output channels x 32 input channels
               (triton_conv_config), software-pipelined; without per-sample masks the
               pixel tiles run over the batch's N*H*W pixels. Channel masks: kept-first
               channel lists (a sort per per-sample mask; static masks' lists cached per mask
               version; the kernel counts the kept channels), work ceil(kept/BLOCK)*BLOCK
               (output tiles <= 32 under an output mask). Weight
               masks: block-sparse over 16x16 channel tiles per tap (~17 small launches for
               the tile lists); unstructured masks leave no tile empty.
  backward     cuda static masks: cuDNN dgrad and wgrad on the kept channels, index
               selects and scatters around them; cuda per-sample masks and every triton variant: cuDNN wgrad on the whole
               problem (TF32) and grad_x by the kernel on the transposed, flipped weight.
  eager        mask multiplies around a dense cuDNN conv (+ bias add); backward dgrad + wgrad.
  compile      the same conv; the mask multiplies fused into one pointwise kernel each side.

Modelled at the kernels of the split SAP / CAS and tensor-core convolution launches (their
Triton launch configurations written out in ``triton_*_config``, the CUDA ones in
``_cuda_cas_stream``, ``cuda_sap_chunks`` and the constants beside the models); a change to a
kernel's passes or launches changes its model here.
"""
from __future__ import annotations

import argparse
import dataclasses
import contextlib
import csv
import functools
import math
import random
import statistics
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Union

import numpy as np
import torch

from . import cas as cas_bench
from . import harness
from . import kwta as kwta_bench
from . import masked_conv as conv_bench
from . import sap as sap_bench
from .harness import COMPILE, EAGER, MODES, PYPRUNE, Case

CUDA = PYPRUNE + "cuda"
TRITON = PYPRUNE + "triton"
PROVIDERS = (EAGER, COMPILE, CUDA, TRITON)

# ---------------------------------------------------------------------------------------------
# Constants, one dict per GPU. Both are sm_90 GH100 parts at the same clock; they differ in HBM.

_HOPPER = {
    "sms": 132,
    # Non-tensor FMA peak: an FMA counts 2 FLOPs and one issue slot of a lane, so the GPU
    # issues fp32_tflops / 2 lane instructions a second, an SM 1/132 of that.
    "fp32_tflops": 60.0,
    # Dense tensor-core peaks by input dtype: float32 runs TF32 (PyTorch's cuDNN default).
    "tensor_tflops": {"float32": 400.0, "float16": 800.0, "bfloat16": 800.0},
    "tensor_eff": 0.5,  # cuDNN / cuBLAS on these layer sizes
    "issue_eff": 0.7,  # share of peak issue a streaming kernel's instructions reach
    # FMA GEMMs: the CUDA kernel's 4x4 micro-tile needs two 16-byte shared loads per 16 FMAs,
    # which caps it near half the FMA rate; Triton's tl.dot with input_precision="ieee" lowers
    # to FMA with operands re-read from shared memory (smaller for 16-wide tiles).
    "cuda_gemm_eff": 0.4,
    # The CUDA per-sample kernel's nvcuda::wmma (a 16 x 16 block per warp, two fragments loaded
    # from shared memory per mma) as a share of tensor_tflops: 30% of the data-sheet dense peaks
    # (TF32 ~495, BF16 ~989 TFLOP/s), about 0.37 of tensor_tflops' 400 / 800.
    "cuda_wmma_eff": 0.37,
    "triton_fma_eff": 0.3,
    "triton_fma16_eff": 0.2,
    # Triton's masked conv on tensor cores, as a share of tensor_tflops (H100 SXM data sheet,
    # dense: TF32 ~495, BF16 ~989 TFLOP/s; tensor_tflops is what cuDNN-class kernels sustain):
    # unpacked, every x and weight element a gathered 4-byte load (channel lists, padding: no
    # TMA, no 16-byte vectors), 3 pipeline stages; 64+ pixel tiles on warpgroup MMA, smaller
    # tiles and the 16-channel weight-mask tiles on narrower MMAs. Packed (16-byte copies, no
    # masks) the same share is assumed: its out-masked 64 x 32 tiles move about 0.38 bytes of
    # shared memory a multiply-add (the wgmma operands and the copies in), which caps an SM
    # near a third of its TF32 rate at 128 bytes a clock; not measured yet.
    "triton_tc_eff": 0.35,
    "triton_tc16_eff": 0.2,
    "l2_gbps": 7000.0,
    "l2_reuse": 0.5,  # share of the L2 a reread's working set may take and still hit
    "kernel_us": 1.5,
    # Latency of one serial step of a CTA, by kind.
    "latency_us": {
        "dram": 0.6,  # a load that misses L2, under load
        "l2": 0.25,  # a load that hits L2
        "barrier": 0.02,  # __syncthreads in a busy block
        "block_scan": 0.1,  # cub::BlockScan of 256 (two barriers and warp shuffles)
        "philox": 0.15,  # one Philox4x32-10: 10 dependent rounds
        "tile_reduce": 0.15,  # a Triton tl.cumsum / tl.max / tl.histogram pick over a block
        "cluster_pass": 0.8,  # the same across a cluster: cluster.sync and the DSMEM merge
        "smem": 0.02,  # one dependent shared-memory load (a binary-search step)
        "warp_step": 0.03,  # a dependent popcount and warp reduction (~60 cycles)
    },
    # Host time of each kind of issue. The Python parts were measured on the dev VM (2-core
    # AMD EPYC, torch 2.13, the cpu backend on 2x4x4x4 tensors, launches subtracted); the GPU
    # machine's host is assumed as fast, and a CUDA launch costs "aten" / "inner" each. The
    # pyprune_* entries are benchmarks/host_overhead.py's figures (its docstring gives the
    # method: thread CPU time, kernels and the engine's own cost subtracted), the median of
    # three runs rounded to 5 us.
    "host_us": {
        "aten": 4.0,  # an aten op called from Python, CUDA launch included
        "inner": 2.5,  # an aten op called from C++ (inside another op or the autograd engine)
        "cudnn": 10.0,  # a cuDNN convolution call (plan cache lookup and launch)
        "triton": 10.0,  # a Triton launcher call from Python
        # triton_kernels/_counters: the kept counters of a launch instead of a fill (a dict
        # lookup and its context, 1.1 us on the dev VM; the stream and capture queries more:
        # host_overhead --launches measures the whole on a GPU machine, as "counters").
        "counters": 1.5,
        "sync": 10.0,  # a device-to-host copy that waits for the stream
        # An eager CUDA call's seed drawn on the host (ops/_random.draw_seed: the generator's
        # offset advanced, a 2-element CPU tensor; no launch).
        "host_seed": 3.0,
        "autograd": 20.0,  # torch.autograd.grad's engine
        "compiled": 50.0,  # a compiled graph's guards and runtime wrappers (no grad)
        "compiled_grad": 120.0,  # more when the forward records autograd (AOTAutograd)
        "compiled_backward": 50.0,  # the compiled backward's wrappers
        "compiled_launch": 3.0,  # one kernel of a compiled graph
        "harness_before": 10.0,  # (after the sync) flush.zero_(), two events, start.record()
        "harness_after": 2.0,  # end.record()
        # The Python of one pyprune call: validation, backend choice, views, autograd wrapper.
        "pyprune_forward": {"kwta": 10.0, "sap": 10.0, "noise": 5.0, "cas": 10.0,
                            "masked_conv": 15.0},
        "pyprune_grad": {"kwta": 5.0, "sap": 5.0, "noise": 5.0, "cas": 10.0,
                         "masked_conv": 5.0},  # more when autograd records the call
        "pyprune_backward": {"kwta": 5.0, "sap": 5.0, "noise": 5.0, "cas": 15.0,
                             "masked_conv": 45.0},
        # The triton backend's launchers do more in Python than the cpu and cuda backends' one
        # C++ call (block sizes, mask layouts and packing, allocations, the launch arguments):
        # host_overhead under TRITON_INTERPRET=1, its Triton launches stubbed (each is charged
        # as "triton" above). These are the figures above times the triton / cpu ratio of the
        # same runs (the median of three on the dev VM, 2026-12-07, whose absolute figures were
        # ~3.5x the ones above on a slower day: a ratio holds across days). Forward: kwta 1.43,
        # sap 2.32, noise 1.74, cas 2.09, masked_conv 1.95; backward: 1.51, 2.12, 1.55, 1.34,
        # 2.19.
        "pyprune_forward_triton": {"kwta": 15.0, "sap": 25.0, "noise": 10.0, "cas": 20.0,
                                   "masked_conv": 30.0},
        "pyprune_backward_triton": {"kwta": 10.0, "sap": 10.0, "noise": 10.0, "cas": 20.0,
                                    "masked_conv": 100.0},
    },
    "event_floor_us": 3.0,  # an event pair around no device work still reads a few us
}

GPUS: dict[str, dict] = {
    "h100": {**_HOPPER, "name": "NVIDIA H100 80GB HBM3", "copy_gbps": 3000.0, "l2_mb": 50.0},
    "h200": {**_HOPPER, "name": "NVIDIA H200", "copy_gbps": 4300.0, "l2_mb": 60.0},
}



# ---------------------------------------------------------------------------------------------
# Launches, host work, synchronisations.


@dataclass(frozen=True)
class Kernel:
    """One launch: what it moves and computes, and what limits its parallelism."""

    name: str
    host_us: float  # host time to issue it
    hbm: float = 0.0  # bytes to and from HBM
    bw_eff: float = 1.0  # share of the copy bandwidth its HBM traffic reaches (measured aten)
    l2: float = 0.0  # bytes reread from L2
    ops: float = 0.0  # CUDA-core lane instructions besides flops
    flops: float = 0.0  # FLOPs: on tensor cores if tensor, else FMAs (flops / 2 instructions)
    tensor: bool = False
    eff: float = 0.0  # share of the peak its compute reaches; 0: the GPU's default
    ctas: int = 0  # CTAs carrying the work; 0: enough to fill the GPU
    per_sm: int = 1  # CTAs resident on one SM
    chain_us: float = 0.0  # serial latency of one CTA
    # Latency before any CTA can compute (every CTA loads, then waits at a barrier first),
    # added to the bound: nothing overlaps it where all CTAs start at once.
    lead_us: float = 0.0


@dataclass(frozen=True)
class Host:
    """Host work with no launch (Python, dispatch)."""

    us: float


@dataclass(frozen=True)
class Sync:
    """The host waits for the stream, then spends us (a device-to-host copy)."""

    us: float


Item = Union[Kernel, Host, Sync]


class Plan:
    """The items of one timed call, built by the op models with one GPU's constants."""

    def __init__(self, gpu: dict, case: Case, provider: str = "") -> None:
        self.gpu = gpu
        self.case = case
        self.provider = provider
        self.items: list[Item] = []

    def lat(self, kind: str) -> float:
        return self.gpu["latency_us"][kind]

    def sm_rate(self) -> float:
        """Lane instructions a us that one SM issues (at the streaming efficiency): the
        compute step of a CTA alone on its SM."""
        return self.gpu["fp32_tflops"] * 1e6 / 2 / self.gpu["sms"] * self.gpu["issue_eff"]

    def host(self, kind: str, op: str | None = None) -> None:
        # The triton backend's launchers have Python figures of their own.
        if self.provider == TRITON and f"{kind}_triton" in self.gpu["host_us"]:
            kind = f"{kind}_triton"
        us = self.gpu["host_us"][kind]
        self.items.append(Host(us[op] if op else us))

    def sync(self) -> None:
        self.items.append(Sync(self.gpu["host_us"]["sync"]))

    def kernel(self, name: str, issue: str = "aten", **work) -> None:
        self.items.append(Kernel(name, self.gpu["host_us"][issue], **work))

    def reread(self, nbytes: float, working_set: float) -> dict:
        """A reread of nbytes inside one launch: L2 traffic if the working set fits."""
        fits = working_set <= self.gpu["l2_reuse"] * self.gpu["l2_mb"] * 1e6
        return {"l2": nbytes} if fits else {"hbm": nbytes}


def _merge(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        for key, value in part.items():
            out[key] = out.get(key, 0.0) + value
    return out


def kernel_time(k: Kernel, gpu: dict, dtype: str) -> tuple[float, str]:
    """(device us, the term that bounds it) of one launch."""
    sms = gpu["sms"]
    share = (min(sms, k.ctas) if k.ctas else sms) / sms
    waves = math.ceil(k.ctas / (sms * k.per_sm)) if k.ctas else 1
    issue_per_us = gpu["fp32_tflops"] * 1e6 / 2
    instructions = k.ops + (0.0 if k.tensor else k.flops / 2)
    terms = {
        "hbm": k.hbm / (gpu["copy_gbps"] * 1e3 * k.bw_eff),
        "l2": k.l2 / (gpu["l2_gbps"] * 1e3),
        "issue": instructions / (issue_per_us * ((k.eff if not k.tensor and k.eff else 0)
                                                 or gpu["issue_eff"]) * share),
        "tensor": (k.flops / (gpu["tensor_tflops"][dtype] * 1e6 * (k.eff or gpu["tensor_eff"])
                              * share) if k.tensor else 0.0),
        "latency": waves * k.chain_us,
    }
    bound = max(terms, key=terms.get)
    return terms[bound] + k.lead_us + gpu["kernel_us"], bound


def simulate(calls: list[list[Item]], gpu: dict, dtype: str) -> list[float]:
    """The end-minus-start event time of each call as the harness times it
    (harness._cuda_times: the device synchronised, then flush, start event, the call, end
    event; so the host's head start is the flush, and no call's time depends on another's; a
    Sync drains the lead)."""
    host_us = gpu["host_us"]
    flush = harness.L2_FLUSH_BYTES / (gpu["copy_gbps"] * 1e3) + gpu["kernel_us"]
    measured = []
    for items in calls:
        times = [kernel_time(i, gpu, dtype)[0] if isinstance(i, Kernel) else 0.0 for i in items]
        host = host_us["harness_before"]
        device = host + flush
        start = device
        for item, t in zip(items, times):
            if isinstance(item, Host):
                host += item.us
            elif isinstance(item, Sync):
                host = max(host, device) + item.us
            else:
                host += item.host_us
                device = max(device, host) + t
        host += host_us["harness_after"]
        device = max(device, host)
        measured.append(device - start)
    return [max(m, gpu["event_floor_us"]) for m in measured]


# ---------------------------------------------------------------------------------------------
# Shared helpers.


def _numel(case: Case) -> int:
    return math.prod(case.shape)


def _esize(case: Case) -> int:
    return case.dtype.itemsize


def _dtype(case: Case) -> str:
    return str(case.dtype).removeprefix("torch.")


def _pow2(v: int) -> int:
    return 1 << max(0, math.ceil(math.log2(v)))


def _pyprune(p: Plan, op: str, grad: bool) -> None:
    p.host("pyprune_forward", op)
    if grad:
        p.host("pyprune_grad", op)


def _compiled(p: Plan, grad: bool) -> None:
    p.host("compiled")
    if grad:
        p.host("compiled_grad")


def _pick(choices: tuple[int, ...], size: int) -> int:
    """The smallest choice >= size, else the largest (the Triton launchers' block choice)."""
    return next((c for c in choices if c >= size), choices[-1])


# The launch configurations of the Triton launchers (triton_kernels/*.py), as the model reads
# them: written out here rather than imported, so that the model states what it assumes.


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def _triton_per_sm(warps: int) -> int:
    """Programs of `warps` warps resident on an SM at ~64 registers a thread (half of the
    SM's 2048 threads)."""
    return max(1, 1024 // (32 * warps))


def triton_kwta_config(length: int) -> tuple[int, int]:
    """kwta._forward_config of a stride-1 group held in registers: (BLOCK, num_warps), 32 keys
    a thread where L is the block (EVEN), 16 else."""
    block = max(_pow2(length), 32)
    keys = 32 if length == block else 16
    return block, min(max(block // (32 * keys), 1), 8)


def triton_kwta_in_registers(length: int) -> bool:
    """kwta._in_registers of a stride-1 group: a power of two up to TRITON_KWTA_MAX_BLOCK, any
    other length up to TRITON_KWTA_MAX_MASKED."""
    return length <= TRITON_KWTA_MAX_MASKED or length == TRITON_KWTA_MAX_BLOCK


TRITON_KWTA_MAX_BLOCK = 8192  # kwta._FWD_MAX_BLOCK
TRITON_KWTA_MAX_MASKED = 4096  # kwta._FWD_MAX_MASKED: larger groups take the split path
TRITON_KWTA_SAMPLE = (1024, 4096)  # kwta._SAMPLE_MIN, kwta._SAMPLE
TRITON_KWTA_CAND_MIN = 16384  # kwta._CAND_MIN
TRITON_KWTA_BAND_BINS = 1024  # kwta._BAND_BINS
TRITON_KWTA_BIN_CAP = 256  # kwta._BIN_CAP
TRITON_KWTA_TAIL = 2048  # kwta._TAIL


def triton_kwta_split_config(groups: int, length: int) -> tuple[int, int, int, int]:
    """kwta._split_config (less RUN): (SAMPLE, sample num_warps, chunk BLOCK, chunk num_warps);
    a sample of L / 64 within [1024, 4096]; chunks of 2048 halved down to 1024 until the filter
    pass has 2 * 132 programs, 8 warps."""
    pow2 = _pow2(length)
    sample = min(TRITON_KWTA_SAMPLE[1], max(TRITON_KWTA_SAMPLE[0], pow2 // 64), pow2)
    block = 2048
    while block > 1024 and groups * math.ceil(length / block) < 2 * 132:
        block //= 2
    return sample, min(max(sample // 256, 1), 16), block, 8


def triton_cas_config(rows: int, channels: int, length: int, classes: int,
                      channels_last: bool = False) -> tuple[int, int, int, tuple[int, ...] | None]:
    """cas._stream_config and cas._logits_config: (BLOCK_K, BLOCK_L, num_warps) of the
    streaming tiles, then (BLOCK_N, BLOCK_C, BLOCK_K, BLOCK_S, num_warps) of the logits kernel.
    Streaming: inner (contiguous) extent from (1, 4, 16, 64, 256), tiles of 2048 elements
    halved down to 512 while the grid has fewer than 264 programs or the tile outgrows the
    outer extent; 8 elements a thread. Logits (more than 64 classes; fewer: None, the stream
    forms them): 16 samples x 16 classes x 128 channels (64 with 4 partials a channel) on
    tl.dot."""
    inner_len, outer_len = (channels, length) if channels_last else (length, channels)
    inner = _pick((1, 4, 16, 64, 256), min(inner_len, 256))
    tile = 2048

    def programs(t: int) -> int:
        return rows * math.ceil(inner_len / inner) * math.ceil(outer_len / (t // inner))

    while tile > 512 and (tile // inner > _pow2(outer_len) or programs(tile) < 264):
        tile //= 2
    block_k, block_l = (inner, tile // inner) if channels_last else (tile // inner, inner)
    chunks = _pick((1, 4), math.ceil(length / block_l))
    logits = ((16, 16, 128 if chunks == 1 else 64, chunks, 8)
              if classes > TRITON_CAS_FUSED_CLASSES else None)
    return block_k, block_l, tile // 256, logits


def triton_sap_config(length: int, draws: int) -> dict:
    """sap._chunk_sizes and the launch constants: E elements per element chunk, D draws per
    draw chunk (DT per tile), the merge's SLOTS (persistent programs) and each launch's warps
    (bernoulli mode's shape: triton_sap_bernoulli_config)."""
    return {"E": 1024 if length >= 16384 else 256,
            "D": 256 * _pow2(max(1, math.ceil((draws + 4) / (256 * 4096)))), "DT": 256,
            "SLOTS": 1056, "STORE_MAX_RATIO": 4,
            "PB": 128, "warps": {"partials": 2, "merge": 2, "bernoulli": 8}}


def triton_conv_config(c_out: int, pixels: int, n: int, out_masked: bool = False,
                       sparse: bool = False, packed: bool = False) -> tuple[int, int, int, int]:
    """masked_conv._blocks and _num_warps on sm_90 for n pixel ranges of `pixels` (n samples,
    or one range over the batch where the masks are shared): (BLOCK_P, BLOCK_CO, BLOCK_CI,
    num_warps). Tiles of 16-128 pixels by 16-128 output channels (at most 128 x 64; output
    channels at most 32 under a bool output mask, 16 x 16 channel tiles under a weight mask),
    the smallest covering choice, then halved while fewer than 3/4 of 132 programs are busy (a
    quarter of the output blocks counted under an output mask): pixels down to 64, output
    channels down to 16, then pixels down to 32 while fewer than 33 are busy. Packed launches
    (on the tensor cores) take the fewest warps that hold 16 accumulators a thread."""
    cap = TRITON_WEIGHT_MASK_BLOCK if sparse else 32 if out_masked else 128
    block_p, block_co = _pick((16, 32, 64, 128), pixels), min(_pick((16, 32, 64, 128), c_out), cap)
    def busy() -> int:
        co_blocks = math.ceil(c_out / block_co)
        busy_co = math.ceil(co_blocks / 4) if out_masked else co_blocks
        return n * math.ceil(pixels / block_p) * busy_co

    while block_p * block_co > 128 * 64 or 4 * busy() < 3 * 132:
        if block_p > 64:
            block_p //= 2
        elif block_co > 16:
            block_co //= 2
        elif block_p > 32 and 4 * busy() < 132:
            block_p //= 2
        else:
            break
    block_ci = TRITON_WEIGHT_MASK_BLOCK if sparse else 32
    if packed:
        return block_p, block_co, block_ci, next(
            (w for w in (4, 8, 16) if block_p * block_co <= 32 * w * 16), 16)
    elements = block_p * block_co + block_ci * (block_p + block_co)
    budget = 30 if block_p >= 64 else 16
    warps = next((w for w in (4, 8, 16) if elements <= 32 * w * budget), 16)
    return block_p, block_co, block_ci, warps


TRITON_WEIGHT_MASK_BLOCK = 16
# masked_conv._SPARSE_MAX_SHARE: above this share of (16-channel block, tap) tiles keeping a
# weight, the weight-mask launch (GATED) runs its dense programs on wp instead.
TRITON_SPARSE_MAX_SHARE = 0.5


def triton_gated_dense_tile(block_p: int) -> tuple[int, int] | None:
    """masked_conv._gated_dense_tile: the dense tiles (pixels, output channels) that a
    weight-mask launch of block_p-pixel block-sparse tiles carries at its 4 warps, None below
    128 pixels (masked_conv._GATED_MIN_P: the block-sparse kernel alone)."""
    return (64, 32) if block_p >= 128 else None


# ---------------------------------------------------------------------------------------------
# k-WTA.


def _kwta_groups(case: Case) -> tuple[int, int, int]:
    """(groups, group size L, k) of a benchmark case."""
    start = 1 if (case.variant or "sample") == "sample" else 2
    if case.variant not in ("", "channel"):
        raise ValueError(f"kwta: no model for variant {case.variant!r}")
    groups, length = math.prod(case.shape[:start]), math.prod(case.shape[start:])
    return groups, length, int(kwta_bench.RATIO * length)


def _key(v: float) -> int:
    bits = struct.unpack("<I", struct.pack("<f", v))[0]
    return bits ^ (0xFFFFFFFF if bits >> 31 else 0x80000000)


def _from_key(key: int) -> float:
    bits = key ^ (0x80000000 if key >> 31 else 0xFFFFFFFF)
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def bucket_share(quantile: float, bits: int) -> float:
    """The share of N(0, 1) values (the kwta benchmark's input) whose float32 key shares its top
    ``bits`` bits with the key of the value at ``quantile``: the candidates left after those
    bits of a radix select for that order statistic."""
    normal = statistics.NormalDist()
    key = _key(normal.inv_cdf(quantile))
    span = (1 << (32 - bits)) - 1
    lo, hi = _from_key(key & ~span), _from_key(key | span)
    return abs(normal.cdf(hi) - normal.cdf(lo))


def _slower_than_h200(p: Plan) -> float:
    """How much longer than on the H200 a memory-bound time measured there takes on p's GPU
    (the ratio of the copy rates)."""
    return GPUS["h200"]["copy_gbps"] / p.gpu["copy_gbps"]


# torch.topk's kernels as an H200 ran them (torch 2.11; benchmarks/results/nvidia-h200/
# kernel_times.csv, the eager rows of the k-WTA cases, 4 MB to 103 MB, 32 to 8192 groups): the
# streaming kernels reach these shares of the copy bandwidth (each launch's kernel_us on top),
# the small ones take these times (us, the launch included; a part per group where they loop
# over groups), and the sort of the k results these rates. (The former model had every pass at
# the copy rate: it put eager's k-WTA at 2.5-4x less device time than the run measured.)
TOPK_DIGIT_BW = 0.45  # computeBlockDigitCounts: a read of x a digit, 4 digits
TOPK_GATHER_BW = 0.22  # gatherTopK: x read, the k values and their int64 indices written
TOPK_COMPARE_BW = 0.42  # x >= threshold (a broadcast operand: TensorIterator's strided path)
TOPK_MUL_BW = 0.6  # x * mask
TOPK_SMALL_US = {  # us a launch: (fixed, per group)
    "fill": (0.7, 0.0), "memset": (1.1, 0.0), "digit_cumsum": (0.7, 0.0008),
    "within_k": (1.1, 0.0015), "scan_by_key": (3.3, 0.0), "scan_by_key_init": (0.7, 0.0),
    "kth_counts": (2.5, 0.0),
}
TOPK_SORT_INPLACE = (16.5, 17800.0)  # k <= 4096, one launch: max(us, values / per us)
TOPK_SORT_SEGMENTED = (30.0, 11300.0, 11)  # >= 128 groups: us + values / per us, launches
TOPK_SORT_ONESWEEP = (60.0, 11000.0, 24)  # fewer groups: one radix sort of (group, value) keys


def _topk(p: Plan, groups: int, length: int, k: int, esize: int, first: str) -> None:
    """torch.topk(k, sorted=True) on CUDA (aten/src/ATen/native/cuda/TensorTopK.cu): the
    multi-block radix select (every k-WTA benchmark case takes it), then the sort of the k
    results; times from the H200 run (TOPK_*)."""
    numel, n = groups * length, groups * length * esize
    out = groups * k * (esize + 8)  # values and int64 indices
    launch = p.gpu["kernel_us"]
    slower = _slower_than_h200(p)

    def small(name: str, kind: str, issue: str = "inner", count: int = 1) -> None:
        fixed, per_group = TOPK_SMALL_US[kind]
        for _ in range(count):
            p.kernel(f"topk: {name}", issue, chain_us=max(0.0, fixed + per_group * groups - launch),
                     ctas=1)

    small("fill", "fill", first)
    small("memset", "memset", count=2)
    for digit in range(4):
        p.kernel(f"topk: computeBlockDigitCounts {digit}", "inner", hbm=n, bw_eff=TOPK_DIGIT_BW)
        small(f"computeDigitCumSum {digit}", "digit_cumsum")
        small(f"computeBlockwiseWithinKCounts {digit}", "within_k")
    small("DeviceScanByKey", "scan_by_key", count=2)
    small("DeviceScanByKeyInit", "scan_by_key_init", count=2)
    small("computeBlockwiseKthCounts", "kth_counts")
    p.kernel("topk: gatherTopK", "inner", hbm=n + out, bw_eff=TOPK_GATHER_BW)
    values = groups * k
    if k <= 4096:  # sortKeyValueInplace: one launch
        us, rate = TOPK_SORT_INPLACE
        p.kernel("topk: radixSortKVInPlace", "inner", ctas=1,
                 chain_us=max(us, values / rate) * slower - launch)
        return
    us, rate, launches = TOPK_SORT_SEGMENTED if groups >= 128 else TOPK_SORT_ONESWEEP
    each = (us + values / rate) * slower / launches - launch
    for i in range(launches):
        p.kernel(f"sort: at::sort launch {i}", "inner", ctas=1, chain_us=max(0.0, each))


# kwta_block_kernel<float, 512, true> (sm_90 SASS), lane instructions an element: a histogram
# pass over global memory (the key, the prefix test, the digit and its predicated shared
# atomic), one that also appends the candidates (their warp scan and stores), the masked write.
CUDA_KWTA_BLOCK_OPS = {"hist": 21, "collect": 29, "write": 8}
# Fitted to the H200 run of 2026-12-04 (the block kernel before the per-element ballot, shuffle
# and candidate atomic were taken out: ~48 instructions an element, ~64 appending; each
# sibling's bins read one after another in the cluster merge), whose busy time over the six
# benchmark cases the counts above (with the old figures) and the trips' round trips explain
# only in part: a pass's fixed part (the histogram clear, 3-4 block barriers, the cluster
# barrier, the bucket pick) of 4.3 us, and 0.24 us a distributed shared memory round trip.
# The fit's error is 17% (log rms) over 24-422 us. Not profiled: the fixed part's cause is
# unknown, and the model carries it unchanged into the present kernel.
CUDA_KWTA_PASS_US = 4.3
CUDA_KWTA_DSMEM_US = 0.24
CUDA_KWTA_MIN_CLUSTER_SLICE = 8192  # kwta.cu's kMinClusterSlice
CUDA_KWTA_MAX_CLUSTER = 16  # kwta.cu's kMaxCluster


def _kwta_cuda_forward(p: Plan, groups: int, length: int, k: int) -> None:
    case, gpu = p.case, p.gpu
    e, numel = _esize(case), _numel(case)
    n = numel * e
    sms = gpu["sms"]
    if length <= 1024:
        # kwta_warp_kernel<float, T, unit>: 256 threads; T = 32 lanes a group at 513-1024
        # elements, unit-stride rows: 78 registers, 3 blocks an SM. Per 32 keys a lane (the
        # sm_90 SASS of that variant, the path of a full group): the loads at constant offsets
        # and the keys (~320 instructions), the 32x32 bit transpose (~420), 32 bit steps of
        # AND, popcount, one redux.sync and the selects (~320), the masked write (~320). (With a
        # run-time T the steps' shuffles ran in a loop that the compiler guarded against
        # divergence, ~40 instructions a step, and the loads took 64-bit address arithmetic:
        # ~2700 a group; 71 us on an H200 at 128x64x32x32, 3.7x this model's device time.)
        lanes = _pow2(math.ceil(length / 32))
        blocks = math.ceil(math.ceil(groups / (32 // lanes)) / 8)
        ctas = min(blocks, sms * 64)
        # A group: its loads, then 32 dependent bit steps, then the write's reload from L2.
        chain = math.ceil(blocks / ctas) * (p.lat("dram") + 32 * p.lat("warp_step") + p.lat("l2"))
        p.kernel("kwta_warp_kernel", "inner", hbm=2 * n, l2=n, ops=numel * 43, ctas=ctas,
                 per_sm=3, chain_us=chain)
        return
    threads = 256 if length <= 8192 else 512
    cluster = 1
    if threads == 512 and groups < 2 * sms and length >= 2 * CUDA_KWTA_MIN_CLUSTER_SLICE:
        # kwta.cu's launch_block: up to 16 blocks a cluster (sm_90), so that the grid reaches
        # two blocks an SM; all groups in flight at once.
        cluster = min(CUDA_KWTA_MAX_CLUSTER, 2 * sms // groups,
                      length // CUDA_KWTA_MIN_CLUSTER_SLICE)
    vec = 16 // e
    chunk = math.ceil(math.ceil(length / cluster) / vec) * vec
    capacity = (16 if cluster > 1 else 24) * 1024 // 4
    ctas = groups * cluster
    per_sm = 1024 // threads
    threads_per_sm = min(per_sm, math.ceil(ctas / sms)) * threads
    # A trip: 16 elements a thread (4 16-byte packs) loaded, then processed; the next trip's
    # loads wait for that (no prefetch), so each trip is a memory round trip plus the SM's
    # issue of its resident threads' element work.
    trip_elements = 16
    trips = math.ceil(chunk / (threads * trip_elements))
    ops = CUDA_KWTA_BLOCK_OPS

    def trip_us(latency: float, per_element: float) -> float:
        return latency + threads_per_sm * trip_elements * per_element / p.sm_rate()

    passes, global_passes, in_shared, local = 3, 0, False, chunk
    walk = 0.0
    for digit in range(passes):
        if not in_shared:
            collect = local <= capacity
            global_passes += 1
            walk += trips * trip_us(p.lat("dram" if global_passes == 1 else "l2"),
                                    ops["collect" if collect else "hist"])
            in_shared = collect
        local = chunk * bucket_share(1 - k / length, min(32, 11 * (digit + 1)))
    chunk_bytes = chunk * e
    working_set = min(ctas, sms * per_sm) * chunk_bytes
    reread = p.reread(global_passes * n, working_set)
    again = p.lat("l2" if "l2" in reread else "dram")
    walk += trips * trip_us(again, ops["write"])
    merge = math.ceil(cluster / 4) * CUDA_KWTA_DSMEM_US if cluster > 1 else 0.0
    # A group's chain: its global passes' trips, each pass's fixed part and the cluster merge,
    # the masked write (a CTA's groups one after another where the grid has more CTAs than the
    # GPU holds: the waves of kernel_time).
    chain = walk + passes * (CUDA_KWTA_PASS_US + merge)
    element_ops = numel * (ops["collect"] + ops["hist"] * (global_passes - 1) + ops["write"])
    p.kernel(f"kwta_block_kernel<{threads}> cluster {cluster}", "inner",
             **_merge({"hbm": 2 * n}, reread),
             ops=element_ops, ctas=ctas, per_sm=per_sm, chain_us=chain)


def _kwta_bracket(length: int, k: int) -> tuple[float, float, float]:
    """(lo, hi, share): the N(0, 1) quantiles at the sample ranks r -+ (4 sd + 16) around
    r = k / L * m of kwta._kwta_sample_kernel (a sample of m), and the share of L between them
    (the band's candidates, at most kwta._candidate_cap)."""
    m = triton_kwta_split_config(1, length)[0]
    q = k / length
    r, margin = q * m, 4 * math.sqrt(m * q * (1 - q)) + 16
    top, bottom = max(math.floor(r - margin), 1) / m, min(math.ceil(r + margin), m) / m
    normal = statistics.NormalDist()
    hi, lo = normal.inv_cdf(1 - top), normal.inv_cdf(max(1 - bottom, 1e-9))
    cap = min(length, max(TRITON_KWTA_CAND_MIN, length // 8)) / length
    return lo, hi, min(bottom - top, cap)


def kwta_candidates(length: int, k: int) -> float:
    """Expected band candidates of one group on the split path."""
    return _kwta_bracket(length, k)[2] * length


# SASS of the Triton k-WTA kernels (sm_90), lane instructions an element: a 5-bit radix pass
# (prefix match, digit, 32-bin tl.histogram; 198-355 in the pass loop of 4-8 keys a thread,
# less ~40 for the digit pick) where a streamed select or the sample's bracket runs one, the
# sample's joint pass (a 64-bin histogram for two ranks), the filter pass (key, compares, two
# block sums, the candidates' cumsum, stores) and the last program's scan over the candidates.
TRITON_KWTA_PASS_OPS = 40
TRITON_KWTA_JOINT_PASS_OPS = 50
TRITON_KWTA_FILTER_OPS = 30
TRITON_KWTA_SCAN_OPS = 25
# _kwta_filter_kernel's registers (sm_90, BLOCK 2048, 8 warps, unit strides as the JIT specializes
# the benchmarks' launch: 3 programs an SM; the strided AOT variant has 60) and the finish
# launch's warps. The H200 run measured ~11 us a filter program (182 us for 4096 programs of
# 2048 elements at 2 an SM) when every atomic there was acq_rel (Triton's default: 11
# MEMBAR.ALL.GPU, each waiting for the program's stores in flight) and the group's last program
# finished the group in the same launch (99 registers); the filter's atomics are relaxed now.
TRITON_KWTA_FILTER_REGS = 75
TRITON_KWTA_FINISH_WARPS = 8
TRITON_KWTA_FINISH_REGS = 128  # kwta._FINISH_MAX_REGS
# _kwta_forward_kernel (float32, sm_90 SASS), by (BLOCK, EVEN: L == BLOCK, no lane masks):
# lane instructions a thread of one pass of the counting select's loop (a compare and an add a
# key, the block sum, the bucket update) and of everything else (loads, keys, the final max
# reduction, the masked store), and the registers a thread (programs an SM: at most 64K
# registers). Groups with stride 1 (UNIT), as the benchmarks'; make gpu-report checks these.
TRITON_KWTA_COUNT_PASS = {
    (32, True): (22, 130, 25), (64, True): (26, 150, 26), (128, True): (33, 191, 30),
    (256, True): (46, 266, 39), (512, True): (74, 414, 60), (1024, True): (124, 724, 92),
    (2048, True): (133, 827, 94), (4096, True): (135, 841, 114), (8192, True): (140, 892, 94),
    (32, False): (22, 130, 24), (64, False): (26, 158, 30), (128, False): (33, 207, 36),
    (256, False): (46, 330, 56), (512, False): (74, 598, 91), (1024, False): (85, 635, 95),
    (2048, False): (87, 641, 95), (4096, False): (86, 634, 108),
}


def count_select(keys: list[int], k: int) -> tuple[int, int]:
    """(the k-th largest key, passes): kwta._select_count's loop on a group's uint32 keys (no
    bracket: all 32 bits), a bit a pass until the k-th largest is the largest or the smallest
    key of its bucket, then that key."""
    prefix, bit, above, pop, need = 0, 32, 0, len(keys), k
    passes = 0
    while bit > 0 and need != 1 and need != pop:
        bit -= 1
        half = prefix | (1 << bit)
        upper = sum(key >= half for key in keys) - above
        if upper >= need:
            prefix, pop = half, upper
        else:
            above, need, pop = above + upper, need - upper, pop - upper
        passes += 1
    top = prefix | ((1 << bit) - 1)
    bucket = [key for key in keys if prefix <= key <= top]
    return (max(bucket) if need == 1 else min(bucket)) if bit > 0 else prefix, passes


@functools.lru_cache(maxsize=None)
def kwta_count_passes(length: int, k: int) -> float:
    """Mean passes of kwta._select_count's counting select (count_select) over groups of
    N(0, 1) float32 values, the benchmarks' data."""
    rng = random.Random(0)
    groups = max(8, 32768 // length)
    total = 0
    for _ in range(groups):
        keys = []
        for _ in range(length):
            (bits,) = struct.unpack("<I", struct.pack("<f", rng.gauss(0.0, 1.0)))
            keys.append(bits ^ (0xFFFFFFFF if bits >> 31 else 0x80000000))
        total += count_select(keys, k)[1]
    return total / groups


def _kwta_triton_forward(p: Plan, groups: int, length: int, k: int) -> None:
    case, sms = p.case, p.gpu["sms"]
    e, numel = _esize(case), _numel(case)
    n = numel * e

    def lane_rate(warps: int) -> float:
        return p.sm_rate() * min(warps, 4) / 4  # a warp per scheduler at most

    def passes_us(elements: int, warps: int, passes: int, ops: float, picks: int = 2) -> float:
        """Radix passes over a block in registers: histogram work and the digit picks."""
        return passes * (elements * ops / lane_rate(warps) + picks * p.lat("tile_reduce"))

    if triton_kwta_in_registers(length):  # _kwta_forward_kernel: one program a group
        block, warps = triton_kwta_config(length)
        per_thread = block // (32 * warps)
        loop, rest, regs = TRITON_KWTA_COUNT_PASS[block, length == block]
        passes = kwta_count_passes(length, k)
        p.host("triton")
        p.kernel("_kwta_forward_kernel", "inner", hbm=2 * n,
                 ops=groups * block * (passes * loop + rest) / per_thread, ctas=groups,
                 per_sm=min(_triton_per_sm(warps), 65536 // (_round_up(regs, 8) * 32 * warps)),
                 chain_us=p.lat("dram") + passes_us(block, warps, passes, loop / per_thread, 1))
        return
    sample, sample_warps, block, warps = triton_kwta_split_config(groups, length)
    chunks = math.ceil(length / block)
    programs = groups * chunks
    lo, hi, share = _kwta_bracket(length, k)
    cand = share * length
    cand_bytes = groups * cand * (e + 4)  # value and int32 position
    # 1. Sample: m values a group in runs of 16, three joint passes (both ranks: 4 picks a
    # pass) to 15-bit buckets; zeroes the group's counters and its 1024 bin counts.
    p.host("triton")
    p.kernel("_kwta_sample_kernel", "inner",
             hbm=groups * (sample * e + 32 + TRITON_KWTA_BAND_BINS * 4),
             ops=groups * sample * (3 * TRITON_KWTA_JOINT_PASS_OPS + 10), ctas=groups,
             per_sm=_triton_per_sm(sample_warps),
             chain_us=p.lat("dram") + passes_us(sample, sample_warps, 3,
                                                TRITON_KWTA_JOINT_PASS_OPS, picks=4))
    # 2. Filter: x read once, out written once (the band as 0), the band's values and positions
    # appended, one relaxed bin-count atomic per band element (L2) and 2 counter atomics a
    # program (one returns the candidates' base: an L2 round trip), two block sums and a
    # cumsum. TRITON_KWTA_FILTER_REGS registers: per_sm programs an SM.
    per_sm = min(_triton_per_sm(warps), 65536 // (_round_up(TRITON_KWTA_FILTER_REGS, 8) * 32 * warps))
    waves = math.ceil(programs / (sms * per_sm))
    program_us = p.lat("dram") + p.lat("l2") + 2 * p.lat("tile_reduce")
    kept_share = 0.5  # the band's half above the threshold is stored again (launch 3)
    fixup_sectors = groups * length / 8 * (1 - (1 - kept_share * share) ** 8)
    hbm = 2 * n + cand_bytes
    p.host("triton")
    p.kernel("_kwta_filter_kernel", "inner", hbm=hbm,
             l2=groups * cand * 4 + programs * 16,
             ops=numel * TRITON_KWTA_FILTER_OPS, ctas=programs, per_sm=per_sm,
             chain_us=program_us)
    # 3. Finish, a program a group: the bin counts read, the threshold's bin picked, the
    # candidates scanned (those above the bin stored as kept, the bin's gathered), a select
    # within the bin in registers (the bits of the bin's key range: ~L2(width) / 5 passes over
    # 256 keys) and the bin's kept values stored. Candidate stores scattered over out: a 32-byte
    # sector written (and filled: read) each.
    bin_bits = max(1, math.ceil(math.log2(max(2, (_key(hi) - _key(lo)) / TRITON_KWTA_BAND_BINS))))
    trips = math.ceil(cand / TRITON_KWTA_TAIL)
    tail_us = (p.lat("l2") + 2 * p.lat("tile_reduce")
               + trips * (p.lat("l2") + TRITON_KWTA_TAIL * TRITON_KWTA_SCAN_OPS / lane_rate(warps))
               + p.lat("l2") + passes_us(TRITON_KWTA_BIN_CAP, warps, math.ceil(bin_bits / 5),
                                         TRITON_KWTA_PASS_OPS))
    fixup = p.reread(2 * 32 * fixup_sectors, n + cand_bytes)
    p.host("triton")
    p.kernel("_kwta_finish_kernel", "inner",
             **_merge({"hbm": 0.0, "l2": groups * cand * (e + 4) + groups * TRITON_KWTA_BAND_BINS * 4},
                      fixup),
             ops=groups * cand * TRITON_KWTA_SCAN_OPS, ctas=groups,
             per_sm=min(_triton_per_sm(TRITON_KWTA_FINISH_WARPS),
                        65536 // (TRITON_KWTA_FINISH_REGS * 32 * TRITON_KWTA_FINISH_WARPS)),
             chain_us=tail_us)


def kwta_forward(p: Plan, provider: str, grad: bool) -> None:
    case = p.case
    groups, length, k = _kwta_groups(case)
    e, numel = _esize(case), _numel(case)
    n = numel * e
    if provider == EAGER:
        _topk(p, groups, length, k, e, "aten")
        p.kernel("x >= thr", "aten", hbm=n + numel, bw_eff=TOPK_COMPARE_BW)
        p.kernel("x * mask", "aten", hbm=2 * n + numel, bw_eff=TOPK_MUL_BW)
    elif provider == COMPILE:
        _compiled(p, grad)
        _topk(p, groups, length, k, e, "compiled_launch")
        p.kernel("fused x * (x >= thr)", "compiled_launch", hbm=2 * n)
    elif provider == CUDA:
        _pyprune(p, "kwta", grad)
        _kwta_cuda_forward(p, groups, length, k)
    elif provider == TRITON:
        _pyprune(p, "kwta", grad)
        _kwta_triton_forward(p, groups, length, k)
    else:
        raise ValueError(f"kwta: no model for provider {provider!r}")


def kwta_backward(p: Plan, provider: str) -> None:
    case = p.case
    _kwta_groups(case)
    numel = _numel(case)
    n = numel * _esize(case)
    if provider == EAGER:
        p.kernel("grad * mask", "inner", hbm=2 * n + numel)
    elif provider == COMPILE:
        p.host("compiled_backward")
        p.kernel("fused grad * (x >= thr)", "compiled_launch", hbm=3 * n)
    elif provider in (CUDA, TRITON):
        p.host("pyprune_backward", "kwta")
        if provider == TRITON:
            p.host("triton")
        p.kernel("kwta backward", "inner", hbm=3 * n, ops=numel * 12)
    else:
        raise ValueError(f"kwta: no model for provider {provider!r}")


def kwta_compulsory(case: Case, mode: str) -> tuple[float, float]:
    numel = _numel(case)
    n = numel * _esize(case)
    forward, backward = 2 * n, 2 * n + numel / 8  # grad, grad_x and one bit of mask
    return {"forward": forward, "backward": backward, "full": forward + backward}[mode], 0.0


# ---------------------------------------------------------------------------------------------
# SAP.


def _sap_shape(case: Case) -> tuple[int, int, int, bool]:
    if case.variant not in ("exact", "bernoulli"):
        raise ValueError(f"sap: no model for variant {case.variant!r}")
    rows, length = case.shape[0], math.prod(case.shape[1:])
    return rows, length, int(sap_bench.RATIO * length), case.variant == "exact"


# torch.multinomial's and scatter_'s kernels as the H200 run measured them (torch 2.11;
# benchmarks/results/nvidia-h200/kernel_times.csv, the eager rows of the SAP cases: 128 rows of
# 65536 and of 16384, 8 of 65536): lane instructions a draw of the sampling kernel (its binary
# search; 356 / 67 / 27 us), a row's serial step of 1024 elements of the scan (104 / 41 / 82 us)
# and of renormRows (one block a row: 53 / 11 / 38 us), and the L2 bytes a draw of the bool
# scatter moves (a random byte written: 117 / 34 / 10 us). The former model charged 250
# instructions a draw, a DRAM round trip and a block scan a step and 9 bytes a draw: eager SAP
# at about half the device time the run measured.
MULTINOMIAL_DRAW_OPS = 800
MULTINOMIAL_SCAN_STEP_US = 1.5
SCATTER_DRAW_L2_BYTES = 96
# Broadcasting elementwise kernels (a (rows, 1) or 0-d operand: TensorIterator's strided path)
# and the row sum, as shares of the copy bandwidth (the same run: x / sum, where, sum).
BROADCAST_BW = 0.5


def _multinomial(p: Plan, rows: int, length: int, draws: int, esize: int, first: str) -> None:
    """torch.multinomial(p, r, replacement=True) on CUDA (MultinomialKernel.cu, the generic
    path): two copies, renormRows, cumsum, then one thread per draw binary-searching the row's
    prefix sums; the H200 run's times (MULTINOMIAL_*)."""
    n = rows * length * esize
    total = rows * draws
    p.kernel("multinomial: copy", first, hbm=2 * n)
    p.kernel("multinomial: copy", "inner", hbm=2 * n)
    # renormRowsL1: a block a row, a DRAM round trip each 1024 elements
    p.kernel("multinomial: renormRows", "inner", hbm=3 * n, ctas=rows,
             chain_us=math.ceil(length / 1024) * p.lat("dram"))
    # scan_innermost_dim: a block per row, 1024 elements a serial step
    p.kernel("multinomial: cumsum", "inner", hbm=2 * n, ctas=rows,
             chain_us=math.ceil(length / 1024) * MULTINOMIAL_SCAN_STEP_US)
    p.kernel("multinomial: sampleMultinomialWithReplacement", "inner", hbm=total * 8,
             l2=total * 4 * 32, ops=total * MULTINOMIAL_DRAW_OPS)


# csrc/cuda/sap.cu's chunking (sap_cuda_common), from (L, r) only.
CUDA_SAP_CHUNK = 2048  # kChunk: elements of a chunk (two packs of 4 a thread)
CUDA_SAP_DRAW_GROUP = 1024  # kDrawGroup: draws of one Philox group a thread
# sap_merge_kernel<float> (256 threads, nvcc 13.0 sm_90 SASS), instructions a thread on the path
# of the benchmarks' data (r = L, W = 1, p < 2^-7): an item's element work ("item": loads, the
# element scan, the draw-chunk counts, the bounds and flags in shared memory, q, src / q, the
# stores; 8 elements), a draw chunk reaching the item ("chunk": a Philox group, 4 spacings,
# the chunk's two block scans, 4 draws placed, the first by an 11-step search of the bounds,
# the rest mostly by the previous draw's element or the next), the whole-chunk test where
# r >= kWholeChunkRatio * L ("whole": a search of the bounds a chunk) and each further Philox
# group of a chunk ("group", W > 1). Path lengths read off the SASS (branches decided by
# hand), not profiled: the H200 run's 59.6 us busy for the merge at 128x256x8x8 (the
# whole-chunk test then ran at every r, with two searches) is 1.2x what these counts give at
# this model's issue rate (the former estimate, ~60 an element for the draws, gave 15.8 us).
# "stored_chunk": the chunk in stored mode (its 4 positions a thread read back as one 16-byte
# load, placed as above; no Philox, no scans). (The item's q: 3 multiply-adds an element fewer
# since the 4-term log1p series and the degree-5 expm1 of csrc/sap.h: 1250 before. Then the
# item's outputs on sap_outputs' fast path, 8 elements in one straight block of ~200 where the
# per-element branches took ~35 each, and its bounds and flags stored as packs (3 stores, 16
# before): 1226 before; the search of fixed depth, ~5 a step where the bounded one took ~9, and
# the draw test as one unsigned compare, ~6 fewer a placed draw: chunk 630, whole 115, group 300
# and stored_chunk 370 before; each difference read off the SASS of both versions. A
# spacing's range test as one unsigned compare: 2 fewer a draw made, chunk and group.)
CUDA_SAP_MERGE_OPS = {"item": 1140, "chunk": 556, "whole": 75, "group": 268,
                      "stored_chunk": 305}
CUDA_SAP_WHOLE_CHUNK_RATIO = 2  # kWholeChunkRatio
CUDA_SAP_STORE_MAX_RATIO = 4  # kStoreMaxRatio
# The bernoulli elementwise work of csrc/cuda/sap.cu (float, nvcc 13.0 sm_90 SASS, on the path
# of the benchmarks' data: 16-byte packs, src = x, p < 2^-7; branches decided by hand, not
# profiled). bernoulli_pack, one pack of 4 elements: p, the log1p series, both expm1 branches
# and the select, the uniform and its compare, the predicated reciprocal and src / q, the
# rare-path flags and the pack's branches: ~108 (~120 before the 4-term log1p series and the
# degree-5 expm1: 12 multiply-adds a pack fewer, as the SASS's FFMA count shows). Philox4x32-10 side by side with the counters'
# setup (philox_n: 2 IMAD.WIDE and 2 LOP3 a round each, the key's 2 additions a round shared):
# 2 evaluations ~105, 4 ~190.
CUDA_SAP_PACK_OPS = 108
CUDA_SAP_PHILOX_OPS = {2: 105, 4: 190}
# sap_bernoulli_kernel (two-launch path): an item's indices, bounds-checked loads and the
# thread-0 total ~240 a thread of 16 elements, then 4 x (a lone evaluation ~80 + a pack + its
# store ~10).
# The H200 run of 2026-12-04 measured the former kernel (84 counted an element, Philox alone,
# no fast path) at ~105 an element at this model's issue rate: latency the counts leave out.
CUDA_SAP_BERNOULLI_OPS = (240 + 4 * (80 + CUDA_SAP_PACK_OPS + 10)) / 16
# sap_bernoulli_cluster_kernel<float, G> (one launch): a thread's fixed part (indices, G chunks'
# 16-byte loads, |x| sums, the chunk sums' butterflies, the cluster barrier, the DSMEM reads and
# the total) ~150 + 15 G; then per pair of chunks (G > 1; one chunk where G = 1) the Philox
# evaluations side by side, 2 packs a chunk and its stores and loop work ~20.
CUDA_SAP_CLUSTER_FIXED_OPS = (150, 15)
CUDA_SAP_CLUSTER_CHUNK_OPS = 2 * CUDA_SAP_PACK_OPS + 20
# Registers of the float kernels (ptxas, sm_90): blocks of 256 an SM by chunks a block.
CUDA_SAP_CLUSTER_PER_SM = {1: 4, 2: 3, 4: 2}
# bernoulli partials: a thread's chunk sum and its butterfly, the 8 warp sums (no scans).
CUDA_SAP_CHUNK_SUM_OPS = 15
# sap_partials_kernel<float>: a draw chunk's path a thread (a Philox group, 4 spacings, the two
# block scans), W = 1; stored mode adds the positions and their 16-byte store.
# (A spacing's range test as one unsigned compare: 8 fewer a chunk, from 300 and 320.)
CUDA_SAP_PARTIALS_CHUNK_OPS = {"chunk": 292, "stored": 312}
CUDA_SAP_WRITE_CHUNK = 4096  # kWriteChunk: bernoulli pass, 4 Philox groups a thread
CUDA_SAP_MAX_DRAW_CHUNKS = 1 << 16  # kMaxDrawChunks
CUDA_SAP_OWN_TOTAL = 64  # kBernoulliOwnTotal: bernoulli samples of at most this many chunks
CUDA_SAP_OWN_PREFIX = 256  # kMergeOwnPrefix: exact samples of at most this many of each kind
# prefix_chain, a chunk's partial: its shared load (8 in flight), the add and the store, and
# the loop's share: warp instructions of the one thread that runs the chain.
CUDA_SAP_CHAIN_OPS = 3.5
CUDA_SAP_CLUSTER_BLOCKS = 16  # kClusterMaxBlocks (H100 and H200 schedule clusters of 16)
CUDA_SAP_BLOCK_CHUNKS = (4, 2, 1)  # chunks a block the one-launch kernel is built for


def cuda_sap_cluster_plan(rows: int, k: int, sms: int, esize: int = 4) -> tuple[int, int]:
    """sap.cu's cluster_plan: (G chunks a block, C blocks a cluster) of the one-launch bernoulli
    kernel, or (0, 0) for two launches: the most chunks a block that still gives every SM a
    block, else the fewest that fit a cluster of 16 (double: at most 2 chunks a block)."""
    plan = (0, 0)
    for g in CUDA_SAP_BLOCK_CHUNKS:
        if esize == 8 and g > 2:
            continue
        c = math.ceil(k / g)
        if c > CUDA_SAP_CLUSTER_BLOCKS:
            continue
        plan = (g, c)
        if rows * c >= sms:
            break
    return plan


def cuda_sap_one_launch(rows: int, length: int, sms: int, esize: int = 4) -> tuple[int, int]:
    """The one-launch plan of a bernoulli row of ``length`` on sm_90 (sap_cuda_common's
    `clustered`): cuda_sap_cluster_plan where L % 4 == 0, else (0, 0)."""
    if length % 4:
        return (0, 0)
    return cuda_sap_cluster_plan(rows, math.ceil(length / CUDA_SAP_CHUNK), sms, esize)


def cuda_sap_chunks(length: int, draws: int, exact: bool) -> tuple[int, int, int, int]:
    """(K element chunks, NB draw chunks, W Philox groups a thread per draw chunk, KW bernoulli
    chunks) per sample."""
    k = math.ceil(length / CUDA_SAP_CHUNK)
    d = CUDA_SAP_DRAW_GROUP
    w = max(1, math.ceil((draws + 4) / (d * CUDA_SAP_MAX_DRAW_CHUNKS))) if exact else 1
    nb = math.ceil((draws + 4) / (d * w)) if exact else 0
    return k, nb, w, math.ceil((length + 3) / CUDA_SAP_WRITE_CHUNK)


def _sap_cuda(p: Plan, rows: int, length: int, draws: int, exact: bool, backward: bool) -> None:
    """sap.cu's three launches (forward, or backward: the same passes with grad as src).

    Lane instructions, from the sm_90 SASS of the float32 kernels (nvcc 13.0; most static
    instructions lie in paths a realistic input never takes: Goldberg's log, the slow
    divisions, scalar loads): a lone Philox4x32-10 ~80 (10 rounds of 2 IMAD.HI, 2 IMAD, 2 LOP3,
    2 IADD and moves; side by side, CUDA_SAP_PHILOX_OPS); a spacing ~7 (uniform, MUFU.LG2, the
    clamp) and ~5 for its 64-bit range checks; the two block scans of a chunk (sum, then max)
    ~50 a thread; the bernoulli work of a pack of 4 (CUDA_SAP_PACK_OPS: p, the log1p series,
    the degree-8 expm1 polynomial and MUFU.EX2, both taken: y straddles -1/2 at r = L, the
    uniform's compare, src / q by MUFU.RCP)."""
    e = _esize(p.case)
    n = rows * length * e
    lat = p.lat
    c, d = CUDA_SAP_CHUNK, CUDA_SAP_DRAW_GROUP
    k, nb, w, kw = cuda_sap_chunks(length, draws, exact)
    acc = 8 if e == 8 else 4
    ws = rows * (k + nb) * acc
    per_sm = 2 if e == 8 else 4  # launch bounds: 64 registers (128 in float64)
    scans = 2 * lat("block_scan") + 2 * lat("barrier")
    g_chunks, cluster = cuda_sap_one_launch(rows, length, p.gpu["sms"], e)
    if not exact and g_chunks:
        # sap_bernoulli_cluster_kernel: a cluster of C blocks a sample, block b holding chunks
        # b G .. b G + G - 1 in registers: their sums, one cluster barrier, the sample's K
        # partials read through DSMEM and added by thread 0, the elementwise write. x read
        # once.
        pair = 2 if g_chunks > 1 else 1
        per_thread = (CUDA_SAP_CLUSTER_FIXED_OPS[0] + CUDA_SAP_CLUSTER_FIXED_OPS[1] * g_chunks
                      + g_chunks // pair * (CUDA_SAP_PHILOX_OPS[2 * pair]
                                            + pair * CUDA_SAP_CLUSTER_CHUNK_OPS))
        src = {"hbm": n} if backward else {}
        # Every block loads its chunks and meets its siblings at the cluster barrier before it
        # computes: that lead is not overlapped in the first wave (lead_us). The H200 run of
        # 2026-12-04 measured the former one-launch kernel (a block of 8 elements a thread, two
        # block scans, its K partials read one after another) at 15.1 us for 128x256x8x8, where
        # this form gives 11.8 (10.0 without the lead).
        lead = lat("dram") + 3 * lat("barrier") + lat("cluster_pass") + k * 0.0023
        p.kernel("sap_bernoulli_cluster_kernel", "inner", **_merge(src, {"hbm": 2 * n}),
                 ops=rows * cluster * 256 * per_thread, ctas=rows * cluster,
                 per_sm=2 if e == 8 else CUDA_SAP_CLUSTER_PER_SM[g_chunks],
                 chain_us=lead + g_chunks * lat("philox"), lead_us=lead)
        return
    # 1. Partials: a block per (sample, element chunk): |x| summed (x read once); exact, a block
    # per (sample, draw chunk): the W Philox groups of each thread, their spacings summed.
    ops = rows * k * c * (3 + (50 if exact else CUDA_SAP_CHUNK_SUM_OPS) / 8)
    chain = lat("dram") + (scans if exact else 2 * lat("barrier"))
    # Stored mode: the partials pass writes each draw's in-chunk position, the merge reads it.
    stored = exact and w == 1 and draws <= CUDA_SAP_STORE_MAX_RATIO * length
    kept = rows * nb * d * acc if stored else 0
    if exact:
        ops += rows * nb * 256 * (CUDA_SAP_PARTIALS_CHUNK_OPS["stored" if stored else "chunk"]
                                  + (w - 1) * CUDA_SAP_MERGE_OPS["group"])
        chain = max(chain, w * (lat("philox") + 4 * 7 / p.sm_rate() * 256) + scans)
    p.kernel("sap_partials_kernel", "inner", hbm=n + ws + kept, ops=ops, ctas=rows * (k + nb),
             per_sm=per_sm, chain_us=chain)
    # 2. Prefix: a block per sample, one thread per sequence adding 8 staged values per shared
    # round trip (dependent FADDs of ~4 cycles). Bernoulli samples of at most
    # CUDA_SAP_OWN_TOTAL chunks skip it: thread 0 of each bernoulli block adds the K partials.
    # Exact samples of at most CUDA_SAP_OWN_PREFIX chunks of each kind skip it: each merge
    # block stages the K + NB partials in shared memory and runs both chains there.
    own_total = not exact and k <= CUDA_SAP_OWN_TOTAL
    own_prefix = exact and max(k, nb) <= CUDA_SAP_OWN_PREFIX
    steps = max(k, nb)
    chain_steps = steps * (lat("smem") / 8 + 0.0023)  # one chain: dependent FADDs of ~4 cycles
    if not own_total and not own_prefix:
        chain = math.ceil(steps / 256) * (lat("dram") + 2 * lat("barrier") + lat("l2")) + \
            chain_steps
        p.kernel("sap_prefix_kernel", "inner", hbm=2 * ws, ops=rows * (k + nb) * 12, ctas=rows,
                 per_sm=8, chain_us=chain)
    # 3. x again (from L2 where all of x stayed there since launch 1), grad in backward, out.
    reads = _merge({"hbm": n} if backward else {}, p.reread(n, n))
    if exact:
        # Merge + write, a block per (sample, element chunk): the element scan, the draw chunks
        # of its range found by block-wide counts over D (1 round trip, 2 beyond 256 chunks),
        # G of them generated (one spacing pass to scan, the positions in a second from the
        # kept values), each in-range draw placed by a search that starts at the thread's
        # previous draw's element; then q and src / q.
        in_range = c * draws / length  # draws landing in one element chunk
        g = min(nb, in_range / (d * w) + 1)
        rounds = 1 if nb <= 256 else 2
        counts = CUDA_SAP_MERGE_OPS
        chunk_ops = (counts["stored_chunk"] if stored
                     else counts["chunk"] + (w - 1) * counts["group"]) + (
            counts["whole"] if draws >= CUDA_SAP_WHOLE_CHUNK_RATIO * length else 0)
        per_cta = 256 * (counts["item"] + 16 * (rounds - 1) + g * chunk_ops)
        if own_prefix:  # the staging (~8 a thread) and both chains, one lane each of its warp
            per_cta += 256 * 8 + 32 * (k + nb) * CUDA_SAP_CHAIN_OPS
        reads = _merge(reads, p.reread(rows * k * g * d * acc, kept) if stored else {})
        chain = (lat("dram") + scans + lat("barrier") + rounds * (lat("l2") + 2 * lat("barrier"))
                 + lat("l2") + 2 * lat("barrier")
                 + g * (w * lat("philox") + scans + 12 * lat("smem")) + lat("barrier"))
        if own_prefix:  # (the staging's L2 load overlaps x's)
            chain += 2 * lat("barrier") + chain_steps
        l2 = rows * k * ((2 * min(nb, 256) + 2 * g) * acc + 32)
        p.kernel("sap_merge_kernel", "inner", **_merge(reads, {"hbm": n, "l2": l2}),
                 ops=rows * k * per_cta, ctas=rows * k, per_sm=2 if e == 8 else 3,
                 chain_us=chain)
    else:
        # Elementwise, a block per (sample, chunk of 4096 global values): one Philox per 4
        # elements, q, the uniform compare, src / q; 16-byte packs. Without the prefix launch,
        # thread 0 first adds the sample's K partials (L2 reads, dependent FADDs of ~4 cycles)
        # while the other warps load and run their Philox; two barriers.
        ops = rows * length * CUDA_SAP_BERNOULLI_OPS
        chain = lat("dram") + 2 * lat("philox")
        l2 = {}
        if own_total:
            ops += rows * kw * k * 2
            chain = max(chain, lat("l2") + k * 0.0023 + 2 * lat("barrier"))
            l2 = {"l2": rows * kw * k * acc}
        p.kernel("sap_bernoulli_kernel", "inner", **_merge(reads, {"hbm": n}, l2), ops=ops,
                 ctas=rows * kw, per_sm=2 if e == 8 else 3, chain_us=chain)


def _sap_kernel(p: Plan, provider: str, backward: bool) -> None:
    """pyprune's SAP kernel (forward, or backward: the same pass on grad) for one call."""
    rows, length, draws, exact = _sap_shape(p.case)
    if provider == CUDA:
        _sap_cuda(p, rows, length, draws, exact, backward)
    else:
        _sap_triton(p, rows, length, draws, exact, backward)


# _sap_merge_kernel's instructions a thread (2 warps; float32, sm_90 SASS of the launch as the
# benchmarks' JIT specializes it: unit strides, 16-byte aligned rows) by E: an item's element
# work (bounds, scratch slot, q, the write; the Goldberg log path skipped, as for the
# benchmarks' samples), a step of the draw-chunk search (128 probes), a draw tile of DT = 256
# (a Philox a thread, four logs, the tile cumsum, four branchless searches of log2(E) steps,
# the hit stores; "stored_": the tile reading the partials pass's running sums back instead of
# making the draws), and the AOT variant's registers (capped at 128, 136 making the draws), so
# 8 (6) programs an SM (the per-partition register file). make gpu-report checks
# the tiles and the registers against the SASS. (The items' q: 3 multiply-adds an element
# fewer since the 4-term log1p series and the degree-5 expm1: 431 and 1434 before.)
TRITON_SAP_MERGE_OPS = {
    256: {"item": 419, "search_step": 90, "tile": 466, "regs": 115, "stored_tile": 215,
          "stored_regs": 94},
    1024: {"item": 1386, "search_step": 91, "tile": 518, "regs": 136, "stored_tile": 266,
           "stored_regs": 128},
}
# _sap_partials_kernel (2 warps, 32 registers: 32 programs an SM), instructions a thread of a
# draw chunk (sm_90 SASS, float32): "tile", a trip of the draw loop (a Philox a thread, four
# logs, the sum; 4 warps computed each Philox twice: twice the lane instructions), "setup" the
# chunk's seed and indices around it, "stored" the whole one-tile chunk in stored mode (the
# running sums, their 4 stores and the partial from the last of them). make gpu-report
# checks the tile against the SASS.
TRITON_SAP_PARTIALS_OPS = {"tile": 244, "setup": 40, "stored": 326}
TRITON_SAP_PARTIALS_PER_SM = 32

# _sap_bernoulli_kernel's lane instructions a thread (float32, unit stride, 16-byte aligned
# rows, L % 4 == 0 (ALIGNED: 16-byte loads and stores), sm_90 SASS; 16 elements a thread a
# block of 4096): an elementwise item's fixed work (the ticket and its one-division decode, the
# wait, its count past the wait and the kept counters' resets, the seed, the sample's one
# partial (KP = 1) read as scalars) and each of its HALVES blocks on the fast path (a sample
# whose p are all below 2^-7 and whose total needs no 2^64 scale: p = |x| / total in one
# multiply, q from the series, exp through ex2.ftz with no range fix-up, no p >= 1 test),
# forward (src is x) and backward (src loaded too); "few_partials" each further partial up to
# 4 (the same scalar loop, unrolled by ptxas), "many_partials" what the block-wide reduction
# of a PB tile adds instead from KP = 5 on; a partials item's fixed work and each of its 2
# HALVES blocks (sum and max |x|), then the release. 49.6 an element forward at HALVES 2
# (KP = 1), 45.9 at 4 (KP = 2); partials 8.5 and 6.7 an element of x. Per element of a
# block: ~14 Philox and addresses, 2.6 the uniform, 16 q (log1p series of 4 terms, the
# degree-5 expm1), 2 the quotient (the hardware reciprocal and a multiply, where div.full
# took 9 with its range checks), ~2 the block's test for a zero uniform (a minimum of the
# words, REDUX and one cross-warp step), the select and the store. (Before the reciprocal and
# the shorter polynomials: 822 forward, 843 backward; before the fast path: 937 forward and
# 311 fixed; with two launches before that: 1190.)
TRITON_SAP_BERNOULLI_ITEM_OPS = {"fixed": 265, "forward": 661, "backward": 702,
                                 "few_partials": 31, "many_partials": 82,
                                 "partials_fixed": 237, "partials": 76}


def triton_sap_bernoulli_ops(halves: int, mode: str, kp: int = 1) -> tuple[float, float]:
    """(elementwise, partials) lane instructions an element of x at HALVES blocks an item and
    KP partials items a sample."""
    c = TRITON_SAP_BERNOULLI_ITEM_OPS
    fixed = c["fixed"] + (c["many_partials"] if kp > 4 else c["few_partials"] * (kp - 1))
    elementwise = (fixed + halves * c[mode]) / (16 * halves)
    return elementwise, (c["partials_fixed"] + 2 * halves * c["partials"]) / (32 * halves)


def triton_sap_bernoulli_block(length: int) -> int:
    """sap.bernoulli_block: the smallest of 256, 1024 and 4096 elements that holds a row and
    the up to 3 elements before it of its first Philox group, else 4096."""
    span = length + (3 if length % 4 else 0)
    return next(b for b in (256, 1024, 4096) if span <= b or b == 4096)


def triton_sap_bernoulli_config(rows: int, length: int, block: int | None = None) -> dict:
    """sap.bernoulli_config: HALVES, KP and KB items a sample, LAG samples, the grid."""
    block = triton_sap_bernoulli_block(length) if block is None else block
    halves = next(h for h in (4, 2, 1) if h == 1 or (length > h // 2 * block
                                                and rows * math.ceil(length / (h * block)) >= 132))
    item = halves * block
    kp = math.ceil(length / (2 * item))
    kb = math.ceil((length + (3 if length % 4 else 0)) / item)
    lag = min(rows, math.ceil(132 / (kp + kb)))
    return {"HALVES": halves, "KP": kp, "KB": kb, "LAG": lag, "programs": rows * (kp + kb)}


def _sap_triton_bernoulli(p: Plan, rows: int, length: int, backward: bool) -> None:
    """triton_kernels/sap.py bernoulli mode: one launch (its counters kept zero between
    launches: no fill) of partials and elementwise items in ticket order (8 warps, 2 programs
    an SM). A
    sample's partials items read x from HBM (sum and max |x| of 2 HALVES blocks); its
    elementwise items (HALVES blocks of 4096: 1, 2 or 4),
    LAG samples of items later (about the programs resident at once), read x again from L2
    (the window between the two reads is LAG samples of x), src beside it in backward, and
    write out. The partials of later samples stream while earlier samples' elementwise items
    compute, so the launch takes the larger of its HBM and issue times (lane instructions
    counted in the sm_90 SASS: TRITON_SAP_BERNOULLI_ITEM_OPS), after a lead: the first LAG
    samples' partials, before any elementwise item can start. (The instruction counts are the
    4096-element block's: rows of up to 1024 elements take a smaller one, and no benchmark case
    has them.)"""
    cfg = triton_sap_bernoulli_config(rows, length)
    e = _esize(p.case)
    n = rows * length * e
    lat = p.lat
    elementwise, partials = triton_sap_bernoulli_ops(cfg["HALVES"],
                                                     "backward" if backward else "forward",
                                                     cfg["KP"])
    p.host("counters")
    p.host("triton")
    window = cfg["LAG"] * length * e
    again = p.reread(n, window)
    src = {"hbm": n} if backward else {}
    ops = rows * length * (elementwise + partials)
    p.kernel("_sap_bernoulli_kernel", "inner",
             **_merge({"hbm": 2 * n + rows * cfg["KP"] * 8}, again, src,
                      {"l2": rows * cfg["KB"] * cfg["KP"] * 8}),
             ops=ops, ctas=cfg["programs"], per_sm=2,
             chain_us=lat("l2") + 2 * lat("dram") + lat("philox") + 3 * lat("tile_reduce"),
             lead_us=window / (p.gpu["copy_gbps"] * 1e3))


def _sap_triton(p: Plan, rows: int, length: int, draws: int, exact: bool, backward: bool) -> None:
    """triton_kernels/sap.py: two launches in exact mode (bernoulli: _sap_triton_bernoulli).
    Partials over (sample, chunk): sum |x| of E elements (~4 ops each) and the Exp(1) spacings
    of a draw chunk (one Philox per 4 draws, a log, a sum: TRITON_SAP_PARTIALS_OPS), each
    program then counting itself done; the sample's last one makes both prefix rows (a cumsum
    and a running max per PB partials, from L2), a serial tail after the last sample's
    partials that nothing overlaps (lead_us). Then the merge
    over (sample, element chunk) items in at most SLOTS persistent programs (2 warps capped at
    128 registers, 136 where the merge makes the draws: 8 (6) an SM at E = 1024). Per item:
    the chunk's x and src (x again from L2 where all of x fits since the partials pass), its
    bounds written to the program's scratch slot, two searches of the draw-chunk prefix (128
    probes a step), then per draw tile reaching the chunk (its range's draws and the rest of
    the chunks they start and end in) the running sums read back (r <= 4 L) or a Philox per 4
    draws, logs and a cumsum, and a binary search of log2(E) dependent L1 loads per draw; the
    bounds, q and the write per element: TRITON_SAP_MERGE_OPS, counted in the SASS (~200 lane
    instructions an element at E = 1024 and r = L, ~275 making the draws; the model charged
    ~210 before counting, while the 4-warp kernel then had ~410: the H200 run's 41.7 us busy
    for its merge at 128x256x8x8 is what ~400 take at this model's issue rate)."""
    if not exact:
        _sap_triton_bernoulli(p, rows, length, backward)
        return
    cfg = triton_sap_config(length, draws)
    e = _esize(p.case)
    n = rows * length * e
    lat = p.lat
    chunk, per_chunk, tile = cfg["E"], cfg["D"], cfg["DT"]
    k = math.ceil(length / chunk)
    nb = math.ceil((draws + 4) / per_chunk)
    draw_chain = math.ceil(per_chunk / tile) * (lat("philox") + lat("tile_reduce"))
    # Stored mode: the partials pass writes the draws' running sums, the merge reads them.
    stored = per_chunk == tile and draws <= cfg["STORE_MAX_RATIO"] * length
    kept = rows * nb * per_chunk * 4 if stored else 0
    p.host("triton")
    partials = TRITON_SAP_PARTIALS_OPS
    draw_chunk = (partials["stored"] if stored
                  else partials["setup"] + per_chunk / tile * partials["tile"])
    # The prefix rows: the partials read back from L2 and written over, ~20 ops a partial.
    prefix_tail = lat("l2") + ((math.ceil(k / cfg["PB"]) + math.ceil(nb / cfg["PB"]))
                               * (lat("l2") + 2 * lat("tile_reduce")))
    p.kernel("_sap_partials_kernel", "inner", hbm=n + rows * (k + nb) * 4 + kept,
             l2=2 * rows * (k + nb + 2) * 4,
             ops=(rows * length * 4 + rows * nb * 32 * cfg["warps"]["partials"] * draw_chunk
                  + rows * (k + nb) * 20),
             ctas=rows * (k + nb), per_sm=TRITON_SAP_PARTIALS_PER_SM,
             chain_us=max(lat("dram") + lat("tile_reduce"), draw_chain), lead_us=prefix_tail)
    p.host("triton")
    # x once more (from L2 where all of x fits), src loaded beside it (the same lines in
    # forward: L2), out written.
    again = p.reread(n, n)
    src = {"hbm": n} if backward else {"l2": n}
    items = rows * k
    slots = min(items, cfg["SLOTS"])
    # The range's draws and the rest of the chunks they start and end in.
    examined = chunk * draws / length + per_chunk
    steps = math.ceil(math.log2(chunk))
    probes = 2 * max(1, math.ceil(math.log(max(nb, 2), 128)))
    tiles = examined / tile
    item_chain = (lat("dram") + 3 * lat("tile_reduce") + 3 * lat("barrier")
                  + probes * (lat("l2") + lat("tile_reduce"))
                  + math.ceil(tiles)
                  * (lat("philox") + lat("tile_reduce") + steps * lat("smem")) + lat("l2"))
    counted = TRITON_SAP_MERGE_OPS[chunk]
    kind = "stored_" if stored else ""
    threads = 32 * cfg["warps"]["merge"]
    # The running sums of the tiles reaching each item, from L2 where all of them fit.
    read_back = p.reread(items * examined * 4, kept) if stored else {}
    p.kernel("_sap_merge_kernel", "inner",
             **_merge(again, src, read_back, {"hbm": n, "l2": items * chunk * 4 * 3}),
             ops=items * threads * (counted["item"] + probes * counted["search_step"]
                                    + tiles * counted[kind + "tile"]),
             ctas=slots,
             per_sm=4 * (16384 // (_round_up(counted[kind + "regs"] * 32, 256)))
             // (threads // 32),
             chain_us=math.ceil(items / slots) * item_chain)


def sap_forward(p: Plan, provider: str, grad: bool) -> None:
    case = p.case
    rows, length, draws, _ = _sap_shape(case)
    e = _esize(case)
    numel = rows * length
    n = numel * e
    if provider == EAGER:
        p.kernel("abs", "aten", hbm=2 * n)
        p.kernel("sum", "aten", hbm=n, bw_eff=BROADCAST_BW)
        p.kernel("a / sum", "aten", hbm=2 * n, bw_eff=BROADCAST_BW)
        _multinomial(p, rows, length, draws, e, "aten")
        p.kernel("zeros_like (bool)", "aten", hbm=numel)
        p.kernel("scatter_", "aten", hbm=rows * draws * 8 + numel,
                 l2=rows * draws * SCATTER_DRAW_L2_BYTES)
        for name in ("neg", "log1p", "r *", "expm1", "neg"):
            p.kernel(name, "aten", hbm=2 * n)
        p.kernel("flat / q", "aten", hbm=3 * n)
        p.kernel("zeros (scalar)", "aten", hbm=e)
        p.kernel("where", "aten", hbm=2 * n + numel, bw_eff=BROADCAST_BW)
    elif provider == COMPILE:
        _compiled(p, grad)
        p.kernel("sum |x|", "compiled_launch", hbm=n)
        p.kernel("p = |x| / sum", "compiled_launch", hbm=2 * n)
        _multinomial(p, rows, length, draws, e, "compiled_launch")
        p.kernel("zeros (bool)", "compiled_launch", hbm=numel)
        p.kernel("scatter", "compiled_launch", hbm=rows * draws * 8 + numel,
                 l2=rows * draws * SCATTER_DRAW_L2_BYTES)
        p.kernel("fused q, x / q, where", "compiled_launch", hbm=2 * n + numel)
    elif provider in (CUDA, TRITON):
        _pyprune(p, "sap", grad)
        p.host("host_seed")
        _sap_kernel(p, provider, backward=False)
    else:
        raise ValueError(f"sap: no model for provider {provider!r}")


def sap_backward(p: Plan, provider: str) -> None:
    case = p.case
    rows, length, _, _ = _sap_shape(case)
    numel = rows * length
    n = numel * _esize(case)
    if provider == EAGER:
        p.kernel("where backward", "inner", hbm=2 * n + numel)
        p.kernel("grad / q", "inner", hbm=3 * n)
    elif provider == COMPILE:
        p.host("compiled_backward")
        p.kernel("fused grad * mask / q", "compiled_launch", hbm=3 * n + numel)
    elif provider in (CUDA, TRITON):
        p.host("pyprune_backward", "sap")
        _sap_kernel(p, provider, backward=True)
    else:
        raise ValueError(f"sap: no model for provider {provider!r}")


def sap_compulsory(case: Case, mode: str) -> tuple[float, float]:
    _sap_shape(case)
    n = _numel(case) * _esize(case)
    forward, backward = 2 * n, 3 * n  # x -> out; grad and x -> grad_x
    return {"forward": forward, "backward": backward, "full": forward + backward}[mode], 0.0


# ---------------------------------------------------------------------------------------------
# Gaussian noise.


def _noise_variant(case: Case) -> bool:
    if case.variant not in ("", "multiplicative"):
        raise ValueError(f"noise: no model for variant {case.variant!r}")
    return case.variant == "multiplicative"


# Per element (module doc). CUDA: the SASS of noise_kernel<float, true> (nvcc 13.0, sm_90):
# ~120 instructions an evaluation of four values (Philox ~75, Box-Muller ~35 with 8 MUFU, the
# 16-byte load and store ~10) and the loop, ~33 a value. Triton: the sm_90 SASS of
# _noise_kernel's unit-stride int32-offset variant as the JIT specializes it (16-byte aligned
# pointers, numel a multiple of 16): 560 instructions a thread for 16 values additive, 576
# multiplicative (Philox ~45 an evaluation with its widening multiplies, a radius ~20 and a
# cos / sin ~16 a pair).
NOISE_OPS = {CUDA: 33, TRITON: 35, COMPILE: 150, EAGER: 30}


def _noise_pass(p: Plan, provider: str, name: str, nbytes: float) -> None:
    case = p.case
    if provider == TRITON:
        p.host("triton")
    p.kernel(name, "inner", hbm=nbytes, ops=_numel(case) * NOISE_OPS[provider])


def noise_forward(p: Plan, provider: str, grad: bool) -> None:
    case = p.case
    multiplicative = _noise_variant(case)
    n = _numel(case) * _esize(case)
    if provider == EAGER:
        p.kernel("randn_like", "aten", hbm=n, ops=_numel(case) * NOISE_OPS[EAGER])
        p.kernel("std * noise", "aten", hbm=2 * n)
        if multiplicative:
            p.kernel("1 + noise", "aten", hbm=2 * n)
        p.kernel("x * (1 + noise)" if multiplicative else "x + noise", "aten", hbm=3 * n)
    elif provider == COMPILE:
        _compiled(p, grad)
        p.kernel("inductor seeds", "compiled_launch", hbm=8)
        # The multiplicative graph keeps its noise for backward (random ops are not recomputed).
        p.kernel("fused tl.randn and x (+ or *)", "compiled_launch",
                 hbm=3 * n if multiplicative and grad else 2 * n,
                 ops=_numel(case) * NOISE_OPS[COMPILE])
    elif provider in (CUDA, TRITON):
        _pyprune(p, "noise", grad)
        p.host("host_seed")
        _noise_pass(p, provider, "noise kernel", 2 * n)
    else:
        raise ValueError(f"noise: no model for provider {provider!r}")


def noise_backward(p: Plan, provider: str) -> None:
    case = p.case
    multiplicative = _noise_variant(case)
    n = _numel(case) * _esize(case)
    if provider not in PROVIDERS:
        raise ValueError(f"noise: no model for provider {provider!r}")
    # d(x + std n)/dx = 1: the gradient passes through, no kernel (but the wrappers run).
    if provider == EAGER:
        if multiplicative:
            p.kernel("grad * (1 + noise)", "inner", hbm=3 * n)
    elif provider == COMPILE:
        p.host("compiled_backward")
        if multiplicative:
            p.kernel("grad * (1 + std * noise)", "compiled_launch", hbm=3 * n)
    else:
        p.host("pyprune_backward", "noise")
        if multiplicative:
            _noise_pass(p, provider, "noise kernel on grad", 2 * n)


def noise_compulsory(case: Case, mode: str) -> tuple[float, float]:
    multiplicative = _noise_variant(case)
    n = _numel(case) * _esize(case)
    backward = 2 * n if multiplicative else 0.0
    return {"forward": 2 * n, "backward": backward, "full": 2 * n + backward}[mode], 0.0


# ---------------------------------------------------------------------------------------------
# CAS.


def _cas_shape(case: Case) -> tuple[int, int, int, int]:
    if case.variant not in ("", "c1000"):
        raise ValueError(f"cas: no model for variant {case.variant!r}")
    return case.shape[0], case.shape[1], math.prod(case.shape[2:]), cas_bench.classes_of(case)


def _cuda_cas_stream(p: Plan, mode: str) -> tuple[int, int]:
    """csrc/cuda/cas.cu's stream_shape for a contiguous NCHW x: (S, chunks per channel; tiles,
    blocks per sample). A group of 2^shift lanes covers a chunk of 2^shift * V positions of one
    channel (V = 16 bytes / element: 16-byte packs where L allows them, else V scalar loads a
    lane); a block of 256 threads holds 256 / 2^shift groups of U packs each (Slots: 4 packs
    forward, 2 backward, halved for 2-byte types)."""
    _, channels, length, _ = _cas_shape(p.case)
    e = _esize(p.case)
    v = 16 // e
    shift = min(5, max(0, math.ceil(math.log2(math.ceil(length / v)))))
    chunk = (1 << shift) * v
    s = math.ceil(length / chunk)
    u = (4 if mode == "train" else 2) // (2 if e == 2 else 1)
    tiles = math.ceil(channels * s / ((256 >> shift) * u))
    return s, tiles


def _cuda_cas_logits(p: Plan, s: int) -> None:
    """cas_logits_kernel<train>: one block per sample: the means from the S partials of each
    channel, then a warp per class. With more than 64 classes: in float32 the means only, then
    addmm; in half types a block per 4 samples (each weight row serves 4 samples) and the
    classes split over up to 8 blocks a SM."""
    rows, channels, _, classes = _cas_shape(p.case)
    e = _esize(p.case)
    lat = p.lat
    if classes > 64 and e == 4:
        # float32: a block per sample stores the means only, then addmm forms the logits.
        p.kernel("cas_logits_kernel<train> (means)", "inner", hbm=rows * (8 + channels * 4),
                 l2=rows * channels * s * 4, ops=rows * channels * s,
                 ctas=rows, per_sm=8,
                 chain_us=math.ceil(channels / 256) * s * lat("l2") + lat("barrier"))
        p.kernel("addmm (logits)", "inner", hbm=classes * channels * e + rows * classes * e,
                 l2=rows * channels * 4, flops=2 * rows * channels * classes)
        return
    r = 4 if classes > 64 and 4 * channels * 4 <= 48 * 1024 else 1
    groups = math.ceil(rows / r)
    cb = 1
    if classes > 64 and groups < 8 * 132:
        cb = min(math.ceil(classes / 8), math.ceil(8 * 132 / groups))
    cpb = math.ceil(classes / cb)
    cb = math.ceil(classes / cpb)
    # The r samples' loads of a step are independent (issued together).
    chain = (math.ceil(channels / 256) * s * lat("l2") + lat("barrier")
             + math.ceil(cpb / 8) * (lat("l2") + math.ceil(channels / 32) * lat("smem")))
    p.kernel("cas_logits_kernel<train>", "inner", hbm=classes * channels * e + rows * 8
             + rows * (classes * e + channels * 4), l2=groups * cb * cpb * channels * e
             + rows * cb * channels * s * 4, ops=rows * cb * (channels * s + cpb * channels * 2),
             ctas=groups * cb, per_sm=8, chain_us=chain)


# triton_kernels/cas.py's _FUSED_MAX_STEP and _FUSED_MAX_STEPS: the backward stream forms
# grad_logits @ weight itself where that takes at most TRITON_CAS_FUSED_MAX_STEPS steps of
# triton_cas_fused_step classes.
TRITON_CAS_FUSED_MAX_STEP = 16
TRITON_CAS_FUSED_MAX_STEPS = 4
TRITON_CAS_GATHER_S = 4  # cas._GATHER_S: the gather's partial loads in flight at once
TRITON_CAS_FUSED_CLASSES = 64  # cas._FUSED_CLASSES: the forward stream forms the logits


def triton_cas_tail(block_k: int, block_l: int, classes: int,
                    warps: int | None = None) -> tuple[int, int]:
    """cas._tail_config: (TAIL_C, LOGIT_K) of the forward stream's logits tail, TAIL_C the
    fewest of 16 and 64 classes that hold them, LOGIT_K channels a step (tile / 2 TAIL_C; a
    weight tile of TRITON_CAS_WIDE_TAIL elements where the grid has at most
    TRITON_CAS_ONE_WAVE warps in all)."""
    tail_c = 16 if classes <= 16 else 64
    logit_k = block_k * block_l // (2 * tail_c)
    if warps is not None and warps <= TRITON_CAS_ONE_WAVE:
        logit_k = max(logit_k, TRITON_CAS_WIDE_TAIL // tail_c)
    return tail_c, logit_k


TRITON_CAS_ONE_WAVE = 132 * 16  # cas._ONE_WAVE
TRITON_CAS_WIDE_TAIL = 1024  # cas._WIDE_TAIL


def triton_cas_fused_step(block_k: int, warps: int) -> int:
    """cas._fused_step: classes a step, a weight tile no larger than the streaming tile."""
    return max(1, min(TRITON_CAS_FUSED_MAX_STEP, warps * 256 // block_k))


def _triton_cas_stream(p: Plan, name: str, passes: int, fused_classes: int = 0,
                       logits: bool = False) -> int:
    """A launch of triton_kernels/cas.py's streaming grid over a contiguous NCHW x: one tile a
    program (no loop), its loads (the tile; the class of the sample, then its weight row; in
    backward the (N, K) a, or with `fused_classes` a formed in the program: that many classes
    of grad_logits and weight rows, triton_cas_fused_step a dependent step, from L2) issued
    before its stores; `passes` tensors of x's size moved (2: x -> out, 3: grad_out,
    x -> grad_x). The per-tile channel sums (N, K, S) and a stay in L2 for the next launch.
    With `logits` (forward, up to TRITON_CAS_FUSED_CLASSES classes) each sample's last program
    forms its means and logits (cas._sample_logits: steps of LOGIT_K = tile / 2 TAIL_C
    channels, TAIL_C = 16 or 64 classes, its partials 4 chunks a round trip and a TAIL_C-row
    weight tile from L2 loaded together): the last sample's tail follows the grid's last wave.
    Returns S, the chunks of a channel."""
    rows, channels, length, _ = _cas_shape(p.case)
    e = _esize(p.case)
    block_k, block_l, warps, _ = triton_cas_config(rows, channels, length, 10)
    k_blocks, s = math.ceil(channels / block_k), math.ceil(length / block_l)
    programs = rows * k_blocks * s
    n = rows * channels * length * e
    step = triton_cas_fused_step(block_k, warps)
    steps = math.ceil(fused_classes / step)
    a_l2 = (programs * steps * step * (4 + block_k * e) if fused_classes
            else rows * channels * 4 if passes == 3 else 0)
    tail_us = tail_l2 = tail_hbm = 0.0
    if logits:
        classes = _cas_shape(p.case)[3]
        tail_c, logit_k = triton_cas_tail(block_k, block_l, classes, programs * warps)
        tail_steps = math.ceil(channels / logit_k)
        tail_us = (p.lat("l2") + tail_steps * math.ceil(s / 4) * p.lat("l2")
                   + p.lat("tile_reduce") + 2 * p.lat("l2"))
        tail_l2 = rows * channels * (s * 4 + tail_c * e)
        tail_hbm = rows * (channels * 4 + classes * e + 16)
    p.kernel(name, "inner", hbm=passes * n + tail_hbm,
             l2=rows * channels * s * 4 + programs * (8 + block_k * e) + a_l2 + tail_l2,
             ops=rows * k_blocks * block_k * s * block_l * (3 if passes == 2 else 5)
             + programs * steps * step * block_k * 3,
             ctas=programs, per_sm=_triton_per_sm(warps),
             chain_us=p.lat("dram") + p.lat("l2") + steps * p.lat("l2"), lead_us=tail_us)
    return s


def _triton_cas_logits(p: Plan) -> None:
    """_cas_logits_kernel: per (block of samples, block of classes) the means from the S
    partials of each channel (L2) and the logits; K / BLOCK_K serial steps of a weight tile and
    ceil(S / BLOCK_S) partial loads each; each program reads its classes' weight rows (L2 but
    the first), so the weight is read rows / BLOCK_N times; the product on tl.dot (IEEE
    float32: FMAs) on (16 samples, 16 classes) tiles (more than 64 classes only)."""
    rows, channels, length, classes = _cas_shape(p.case)
    e = _esize(p.case)
    _, block_l, _, (block_n, block_c, block_k, block_s, warps) = triton_cas_config(
        rows, channels, length, classes)
    s = math.ceil(length / block_l)
    n_blocks, c_blocks = math.ceil(rows / block_n), math.ceil(classes / block_c)
    steps = math.ceil(channels / block_k)
    p.host("triton")
    programs = n_blocks * c_blocks
    product = programs * block_n * block_c * steps * block_k
    sums = programs * steps * block_n * block_k * math.ceil(s / block_s) * block_s * 2
    p.kernel("_cas_logits_kernel", "inner",
             hbm=classes * channels * e + rows * (classes * e + channels * 4 + 16),
             l2=programs * (block_c * channels * e + block_n * channels * s * 4),
             ops=sums, flops=2 * product,
             ctas=programs, per_sm=_triton_per_sm(warps),
             chain_us=steps * math.ceil(s / block_s) * p.lat("l2") + p.lat("tile_reduce"))


def cas_forward(p: Plan, provider: str, grad: bool) -> None:
    case = p.case
    rows, channels, length, classes = _cas_shape(case)
    e = _esize(case)
    n = rows * channels * length * e
    weight = classes * channels * e
    small = weight + rows * (classes * e + channels * 4 + 16)  # weight, logits, means, labels
    lat = p.lat
    if provider == EAGER:
        p.kernel("mean", "aten", hbm=n)
        p.kernel("addmm (logits)", "aten", hbm=small, flops=2 * rows * channels * classes)
        p.kernel("weight[label]", "aten", hbm=rows * channels * e * 2)
        p.kernel("x * m", "aten", hbm=2 * n)
    elif provider == COMPILE:
        _compiled(p, grad)
        p.kernel("fused means and x * weight[label]", "compiled_launch", hbm=2 * n + small)
        p.kernel("mm (logits)", "compiled_launch", hbm=small, flops=2 * rows * channels * classes)
        p.kernel("bias add", "compiled_launch", hbm=rows * classes * e * 2)
    elif provider == CUDA:
        _pyprune(p, "cas", grad)  # the label check: an assert in the streaming kernel
        s, tiles = _cuda_cas_stream(p, "train")
        # Training: the streaming pass (x -> out, partial sums) and the logits kernel.
        p.kernel("cas_rows_kernel<train>", "inner", hbm=2 * n + rows * channels * s * 4,
                 l2=rows * tiles * 256 * 8, ops=rows * channels * length * 4,
                 ctas=rows * tiles, per_sm=4, chain_us=lat("dram") + lat("l2") + lat("barrier"))
        _cuda_cas_logits(p, s)
    elif provider == TRITON:
        _pyprune(p, "cas", grad)
        p.host("triton")
        # Up to 64 classes the stream forms the logits (its per-sample counts kept zero
        # between launches: no fill), else a logits launch follows it.
        fused = classes <= TRITON_CAS_FUSED_CLASSES
        if fused:
            p.host("counters")
        _triton_cas_stream(p, "_cas_stream_kernel (train)", 2, logits=fused)
        if not fused:
            _triton_cas_logits(p)
        # The kernels flag a label out of range; one asynchronous assert reads the flag.
        p.kernel("_assert_async (label flag)", "aten", hbm=8)
    else:
        raise ValueError(f"cas: no model for provider {provider!r}")


def cas_backward(p: Plan, provider: str) -> None:
    case = p.case
    rows, channels, length, classes = _cas_shape(case)
    e = _esize(case)
    n = rows * channels * length * e
    weight = classes * channels * e
    gemm = {"hbm": weight + rows * (classes + channels) * 4, "flops": 2 * rows * channels * classes}
    lat = p.lat
    if provider == EAGER:
        p.kernel("grad_out * m", "inner", hbm=2 * n)
        p.kernel("grad_out * x", "inner", hbm=3 * n)
        p.kernel("sum over (H, W)", "inner", hbm=n)
        p.kernel("index backward: zeros", "inner", hbm=weight)
        for name in ("sort labels", "sort labels", "index_put_ (accumulate)"):
            p.kernel(f"index backward: {name}", "inner", hbm=weight + rows * 16)
        p.kernel("addmm backward: grad_logits @ weight", "inner", **gemm)
        p.kernel("addmm backward: grad_logits.T @ mean", "inner", **gemm)
        p.kernel("addmm backward: sum (bias)", "inner", hbm=rows * classes * e)
        p.kernel("mean backward: expand / L", "inner", hbm=n)
        p.kernel("grad_x accumulate", "inner", hbm=3 * n)
        p.kernel("grad_weight accumulate", "inner", hbm=3 * weight)
    elif provider == COMPILE:
        p.host("compiled_backward")
        p.kernel("mm: grad_logits @ weight", "compiled_launch", **gemm)
        p.kernel("fused grad_x and sum(grad_out * x)", "compiled_launch", hbm=3 * n)
        p.kernel("mm: grad_logits.T @ mean", "compiled_launch", **gemm)
        p.kernel("scatter-add rows", "compiled_launch", hbm=2 * weight + rows * channels * 4)
        p.kernel("sum (bias)", "compiled_launch", hbm=rows * classes * e)
    elif provider == CUDA:
        p.host("pyprune_backward", "cas")
        # a = grad_logits @ weight from C++ (to(acc) and contiguous are no-ops for float32; the
        # streaming kernel divides by L); then the streaming pass (grad_out, x -> grad_x and the
        # partial sums of grad_out * x). Up to 64 classes, the gather: `split` threads a (class,
        # channel) cell, each over every split-th sample, their sums then added in order:
        # grad_weight (the logits path too: each block rereads its mean columns once per
        # sample from L2) and grad_bias. Each sample step waits on an L2 load (the H200 run: 61
        # us for the 128-step loop of split 1 at 128x64x32x32, 3 blocks). More classes: the
        # tiled kernel, a block a 64 x 64 tile of grad_weight (57 registers: 4 blocks an SM),
        # 32 samples staged a step (their grad_logits and mean columns, the partials of the
        # samples whose label is in the tile's rows), then 16 FMAs a thread a sample from
        # shared memory.
        fused = classes <= 64
        p.kernel("mm: grad_logits @ weight", "inner", **gemm)
        s, tiles = _cuda_cas_stream(p, "backward")
        p.kernel("cas_rows_kernel<bwd>", "inner", hbm=3 * n + rows * channels * (s + 1) * 4,
                 l2=rows * tiles * 256 * 8, ops=rows * channels * length * 6,
                 ctas=rows * tiles, per_sm=4, chain_us=lat("dram") + lat("l2") + lat("barrier"))
        cells = classes * channels
        if fused:
            split = 1  # cas.cu gather_split: two blocks an SM where a power of two <= 32 does
            while (split < 32 and split < rows
                   and math.ceil(cells * split / 256) < 2 * p.gpu["sms"]):
                split *= 2
            blocks = math.ceil(cells * split / 256)
            p.kernel("cas_gather_rows_kernel", "inner",
                     hbm=cells * 4 + rows * (classes + channels) * 4 + rows * 8,
                     l2=rows * channels * s * 4 + blocks * rows * 256 // split * 4,
                     ops=cells * rows * 6 + blocks * 256 * 2 * split, flops=2 * cells * rows,
                     ctas=blocks, per_sm=8,
                     chain_us=math.ceil(rows / split) * lat("l2") + lat("barrier") + lat("l2"))
        else:
            tiles_w = math.ceil(classes / 64) * math.ceil(channels / 64)
            stages = math.ceil(rows / 32)
            # A staged sample: two 16-byte shared loads, 16 FMAs, the label test and the loop.
            step_us = 32 * 8 * 256 / p.sm_rate()
            p.kernel("cas_weight_grad_kernel", "inner",
                     hbm=cells * 4 + classes * 4 + rows * (classes + channels) * 4 + rows * 8,
                     l2=tiles_w * rows * 64 * 4 * 2 + rows * channels * s * 4,
                     ops=tiles_w * 256 * rows * 8 + tiles_w * stages * 256 * 20,
                     flops=2 * cells * rows, ctas=tiles_w, per_sm=4,
                     chain_us=stages * (2 * lat("l2") + 3 * lat("barrier") + step_us))
    elif provider == TRITON:
        p.host("pyprune_backward", "cas")
        # In the launcher: a = grad_logits @ weight where the streaming pass does not form it
        # itself (more than TRITON_CAS_FUSED_MAX_STEPS steps; float32: the casts are no-ops),
        # the streaming pass, the gather (grad_weight from the partials, and the bias gradient).
        block_k, _, warps, _ = triton_cas_config(rows, channels, length, classes)
        fused = (math.ceil(classes / triton_cas_fused_step(block_k, warps))
                 <= TRITON_CAS_FUSED_MAX_STEPS)
        if not fused:
            p.kernel("mm: grad_logits @ weight", "aten", **gemm)
        p.host("triton")
        s = _triton_cas_stream(p, "_cas_backward_kernel", 3, classes if fused else 0)
        p.host("triton")
        # A program per (16-64 classes, 32 channels), 8 warps, over the samples 16 at a time:
        # grad_logits, mean, the index and the S partials of t (4 chunks' loads at a time, one
        # L2 round trip each four) loaded together, then two
        # products on tl.dot (IEEE float32: FMAs), grad_logits.T @ mean and the one-hot label
        # rows @ t, and the column sums of grad_logits (the bias gradient, stored by the first
        # channel block).
        block_c = min(64, max(16, _pow2(classes)))
        programs = math.ceil(classes / block_c) * math.ceil(channels / 32)
        steps = math.ceil(rows / 16)
        p.kernel("_cas_gather_kernel", "inner",
                 hbm=classes * channels * 4 + rows * (channels + classes) * 4,
                 l2=programs * rows * (32 * 4 * (s + 1) + block_c * 4 + 8),
                 ops=programs * steps * (16 * 32 * (s + 3) + block_c * (16 + 32) * 2),
                 flops=2 * 2 * programs * steps * block_c * 32 * 16,
                 ctas=programs, per_sm=_triton_per_sm(8),
                 chain_us=lat("l2") + steps * (math.ceil(s / TRITON_CAS_GATHER_S) * lat("l2")
                                               + lat("tile_reduce")))
    else:
        raise ValueError(f"cas: no model for provider {provider!r}")


def cas_compulsory(case: Case, mode: str) -> tuple[float, float]:
    _cas_shape(case)
    n = _numel(case) * _esize(case)
    return {"forward": 2 * n, "backward": 3 * n, "full": 5 * n}[mode], 0.0


# ---------------------------------------------------------------------------------------------
# Masked convolution: 3x3, padding 1, stride 1, bias, C_out = C_in (benchmarks/masked_conv.py).


@dataclass(frozen=True)
class _Conv:
    n: int
    c: int
    pixels: int
    kind: str  # dense, out, in, sample-out, w, b
    keep: float  # kept share of the variant's channels or weights
    esize: int

    @property
    def x(self) -> float:
        return self.n * self.c * self.pixels * self.esize

    @property
    def weight(self) -> float:
        return self.c * self.c * 9 * self.esize

    def flops(self, c_out: float, c_in: float, pixels: float | None = None) -> float:
        return 2 * self.n * (pixels or self.pixels) * c_out * c_in * 9

    @property
    def kept(self) -> int:
        return int(self.c * self.keep)


def _conv_shape(case: Case) -> _Conv:
    variant = case.variant
    kind = variant.rstrip("0123456789")
    known = kind in ("out", "in", "sample-out", "w", "b") and kind != variant
    if not (known or variant == "dense"):
        raise ValueError(f"masked_conv: no model for variant {variant!r}")
    n, c, h, w = case.shape
    return _Conv(n, c, h * w, kind, 1.0 / conv_bench.ideal_speedup(variant), _esize(case))


def _cudnn(p: Plan, name: str, flops: float, hbm: float, issue: str) -> None:
    p.kernel(f"cuDNN {name}", issue, hbm=hbm, flops=flops, tensor=True)


# cuDNN's float32 forward convolution as the H200 run measured it (cuDNN 9 under torch 2.11,
# TF32, NCHW tensors; benchmarks/results/nvidia-h200/kernel_times.csv, the masked_conv cases):
# x and the weight transposed to NHWC first (two launches: 0.24 us a MB of x, 1.3 us a MB of
# weight: 15.6 us for the 9.4 MB of a 512-channel 3x3 weight), the implicit GEMM (11.7 us plus
# the FLOPs at 450 TFLOP/s: 17 us at 2.4 GFLOP, 28 at 7.4) and the output back to NCHW (0.4 us
# a MB). The run's out-masked calls on a gathered weight took 10-40 us for 0.6-3.7 GFLOP
# (cuDNN picking other tiles: 26.7 us at 32x256x8x8 out50, 39.7 at 32x256x14x14 out50, more
# than the whole layer): the model gives them the whole layer's rule. The former model had the
# GEMM at 200 TFLOP/s and no transposes: 1.6-2.3x under the run's eager layers.
CUDNN_TRANSPOSE_X_US_PER_MB = 0.24
CUDNN_TRANSPOSE_W_US_PER_MB = 1.3
CUDNN_TRANSPOSE_OUT_US_PER_MB = 0.4
CUDNN_FPROP_FIXED_US = 11.7
CUDNN_FPROP_TFLOPS = 450.0


def _cudnn_fprop(p: Plan, flops: float, x: float, w: float, out: float, issue: str) -> None:
    """cuDNN's forward convolution of x (bytes) by w into out; float32 as the H200 run measured
    it (CUDNN_*), 16-bit types at the tensor rate."""
    if _esize(p.case) != 4:
        _cudnn(p, "fprop", flops, x + w + out, issue)
        return
    scale = _slower_than_h200(p)  # the transposes
    launch = p.gpu["kernel_us"]
    p.kernel("cuDNN: x to NHWC", issue, hbm=2 * x,
             chain_us=CUDNN_TRANSPOSE_X_US_PER_MB * x / 1e6 * scale)
    p.kernel("cuDNN: weight to KRSC", "inner", hbm=2 * w,
             chain_us=CUDNN_TRANSPOSE_W_US_PER_MB * w / 1e6 * scale)
    p.kernel("cuDNN fprop", "inner", hbm=x + w + out, flops=flops, tensor=True,
             chain_us=CUDNN_FPROP_FIXED_US - launch + flops / (CUDNN_FPROP_TFLOPS * 1e6))
    p.kernel("cuDNN: out to NCHW", "inner", hbm=2 * out,
             chain_us=CUDNN_TRANSPOSE_OUT_US_PER_MB * out / 1e6 * scale)


def _cudnn_forward(p: Plan, g: _Conv, c_out: float, c_in: float, issue: str = "cudnn") -> None:
    """at::conv2d with bias on cuDNN: the convolution, then the bias added in place."""
    out = g.n * c_out * g.pixels * g.esize
    _cudnn_fprop(p, g.flops(c_out, c_in), g.x * c_in / g.c, g.weight * c_out * c_in / g.c**2,
                 out, issue)
    p.kernel("bias add", "inner", hbm=2 * out)


def _cudnn_backward(p: Plan, g: _Conv, c_out: float, c_in: float, dgrad: bool = True,
                    wgrad: bool = True, bias: bool = True) -> None:
    out = g.n * c_out * g.pixels * g.esize
    x = g.x * c_in / g.c
    w = g.weight * c_out * c_in / g.c**2
    if dgrad:
        _cudnn(p, "dgrad", g.flops(c_out, c_in), out + w + x, "cudnn")
    if wgrad:
        _cudnn(p, "wgrad", g.flops(c_out, c_in), out + x + w, "cudnn")
    if bias:
        p.kernel("bias grad: sum over (N, H, W)", "inner", hbm=out)


# masked_conv2d_tc_kernel's K step in the sm_90 SASS, lane instructions a thread, by dtype: the
# gathers of 16 weight values (a shared row pointer, a 32-bit offset, a load) and 8 patch values
# (a 16-byte shared load of the pixel's row, column and offset, two bounds tests, a load), their
# conversion (float32: rounding to TF32) and shared stores, the counters, and the fragment loads
# and mma of 4 (16-bit types: m16n16k16) or 8 (TF32: m16n16k8, an inner loop of two trips) k
# slices. make gpu-report recounts them and fails where these differ by more than
# STEP_OPS_TOLERANCE.
CUDA_TC_STEP_OPS = {"float32": 571, "bfloat16": 387, "float16": 409}
STEP_OPS_TOLERANCE = 0.05


def _dtype_name(case: Case) -> str:
    return str(case.dtype).removeprefix("torch.")


# The packed path (masked_conv.cu: no bool in_mask): pack_kernel's lane instructions an element
# of its tiles (a trip of its image loop, 4 elements a thread: ~125 in the sm_90 SASS without a
# soft in_mask, whose branch adds ~60) and masked_conv2d_tc_packed_kernel's K step of 32
# channels of one tap (ldmatrix, mma.sync: float32 TF32 m16n8k8, 16-bit m16n8k16; the W' copies'
# addresses; per tap also the X' copies and the tap counters, patch tiles the tap counters and
# the test for the chunk's patch copies), lane instructions a thread, by (the tile's rows, patch
# tiles): rows 32 by 64 pixels where a sample has more than 32 output pixels or tiles run
# across samples, else 64 x 32. Patch tiles add, once a chunk, the copies' set-up
# (CUDA_PATCH_SETUP_OPS) and CUDA_PATCH_TRIP_OPS a trip of their loop (one 16-byte copy a
# thread, 256 / (32 x element bytes / 16) patch pixels a trip). 4 CTAs an SM by registers (64);
# patch tiles 3 (80), and by shared memory.
CUDA_PACK_OPS = 32
CUDA_TC_PACKED_STEP_OPS = {(64, False): {"float32": 67, "bfloat16": 55, "float16": 55},
                           (32, False): {"float32": 69, "bfloat16": 55, "float16": 55},
                           (64, True): {"float32": 81, "bfloat16": 62, "float16": 62},
                           (32, True): {"float32": 69, "bfloat16": 62, "float16": 62}}
CUDA_PATCH_SETUP_OPS = {64: {"float32": 18, "bfloat16": 18, "float16": 18},
                        32: {"float32": 19, "bfloat16": 18, "float16": 18}}  # by tile rows
CUDA_PATCH_TRIP_OPS = 12
CUDA_PACKED_STAGES = 4
CUDA_PATCH_MAX_SMEM = 102400  # masked_conv.cu kPatchMaxSmem
CUDA_PATCH_PER_SM = 3  # masked_conv.cu kPatchMinBlocks: patch tiles' register cap (80)
SM_SMEM = 228 * 1024  # shared memory an SM (sm_90), 1 KiB of it reserved a CTA


@dataclass(frozen=True)
class _PackedTiling:
    """masked_conv.cu's PackedTiling: the packed kernel's tiles."""
    rows: int  # output channels a tile (by 2048 / rows pixels)
    patch: bool  # X' from a patch of xp (else copied per tap)
    span: bool  # patch tiles across samples
    out_rows: int  # patch tiles: output rows a tile
    pixel_tiles: int  # a sample's (span: the batch's)
    patch_pixels: int  # patch tiles: xp pixels of the largest patch
    smem: int  # dynamic shared memory, bytes

    def ctas(self, n: int, kept: int) -> int:
        return (1 if self.span else n) * self.pixel_tiles * math.ceil(kept / self.rows)

    @property
    def per_sm(self) -> int:
        """CTAs an SM: 4 by registers (64 a thread), patch tiles 3 (80), and by shared memory."""
        return min(CUDA_PATCH_PER_SM if self.patch else 4, SM_SMEM // (self.smem + 1024))


CUDA_PACKED_MAX_SPLIT = 8  # masked_conv.cu kMaxSplit


def _cuda_packed_split(ctas: int, chunks: int, sms: int) -> int:
    """masked_conv.cu packed_split: the CTAs a patch tile's K is split over (a cluster each,
    sm_90) where the grid leaves SMs idle: the smallest split with the fewest rounds of CTAs an
    SM relative to it."""
    best, best_cost = 1, 1.0
    if 0 < ctas < sms:
        for split in range(2, min(CUDA_PACKED_MAX_SPLIT, chunks) + 1):
            cost = math.ceil(ctas * split / sms) / split
            if cost < best_cost:
                best, best_cost = split, cost
    return best


def _cuda_packed_tiling(g: _Conv, shared: bool) -> _PackedTiling:
    """masked_conv.cu packed_tiling for a 3 x 3, stride 1, padding 1 convolution of g (shared:
    the samples' output channels are the same, as with static masks): patch tiles of whole
    output rows (across samples where shared) where a map's row fits a tile and the two patch
    buffers (the largest patch's xp rows) fit CUDA_PATCH_MAX_SMEM with the stages; else per tap,
    tiles inside a sample."""
    side = math.isqrt(g.pixels)
    pitch = 32 * g.esize + 16
    span = shared and g.n > 1
    rows = 32 if g.pixels > 32 or span else 64
    tile_pixels = 2048 // rows
    if side <= tile_pixels and g.n > 0:
        rows_all = g.n * side if span else side
        r = min(tile_pixels // side, rows_all)
        tiles = math.ceil(rows_all / r)
        most = 0
        for i in range(min(tiles, side)):
            start = i * r % side
            count = r if span else min(r, side - start)
            most = max(most, (start + count - 1) // side * 2 + count + 2)
        patch_pixels = most * (side + 2)
        smem = (max(CUDA_PACKED_STAGES * rows * pitch, 4 * rows * (tile_pixels + 4))
                + 2 * patch_pixels * pitch)
        if smem <= CUDA_PATCH_MAX_SMEM:
            return _PackedTiling(rows, True, span, r, tiles, patch_pixels, smem)
    rows = 32 if g.pixels > 32 else 64
    tile_pixels = 2048 // rows
    return _PackedTiling(rows, False, False, 0, math.ceil(g.pixels / tile_pixels), 0,
                         CUDA_PACKED_STAGES * (rows + tile_pixels) * pitch)


def _cuda_packed(p: Plan, g: _Conv, out_work: int, in_work: int | None = None,
                 shared: bool = True) -> None:
    """The packed path (bf16 / fp16, float32 under TF32, the benchmark's default): per-sample
    masks without a bool in_mask (shared False), and static masks where _cuda_static_packed
    takes it (a bool in_mask's in_work kept channels listed first by the pack, the masked ones
    never read). pack_kernel (x into (N, H + 2, W + 2, C_pad), the weight into (C_out, 9,
    C_pad), C_pad = in_work (default C) rounded up to 32, a static out_mask's kept rows alone;
    tiles of 32 padded pixels by 32 channels, the weight one image of rows x 9 pixels), then
    masked_conv2d_tc_packed_kernel:
    256 threads, _cuda_packed_tiling's tiles, the tiles past the kept channels only writing
    their zeros, a warp skipping rows past the kept ones and pixels past the tile (16 at a
    time); K steps of 32 channels of one tap, the W' rows (and per tap the X' pixels) copied by
    cp.async CUDA_PACKED_STAGES - 1 steps ahead (a step waits at least an L2 round trip over
    those), one barrier a step; CUDA_TC_PACKED_STEP_OPS lane instructions a thread a step.
    L2 traffic: every CTA copies its kept W' rows over the whole K, and X' once a step (per
    tap: kPixels rows of 32 channels) or once a chunk (patch tiles: the patch's pixels); the
    first read of xp and wp is HBM."""
    in_work = g.c if in_work is None else in_work
    c_pad = math.ceil(in_work / 32) * 32
    side = math.isqrt(g.pixels)
    padded = (side + 2) ** 2
    rows = out_work if shared else g.c  # the weight rows packed
    wp = g.weight * rows / g.c * c_pad / g.c
    x_tiles = g.n * math.ceil(padded / 32) * c_pad // 32
    w_tiles = math.ceil(rows * 9 / 32) * c_pad // 32  # one image of rows x 9 "pixels"
    p.kernel("pack_kernel", "inner",
             hbm=g.x * in_work / g.c + g.n * padded * c_pad * g.esize + 2 * wp,
             ops=(x_tiles + w_tiles) * 32 * 32 * CUDA_PACK_OPS, ctas=x_tiles + w_tiles,
             per_sm=6, chain_us=p.lat("l2") + p.lat("dram"))  # 40 registers
    t = _cuda_packed_tiling(g, shared)
    chunks = c_pad // 32
    steps = 9 * chunks
    groups = (1 if t.span else g.n) * t.pixel_tiles  # pixel tiles of the grid
    tiles = t.ctas(g.n, out_work)
    # Patch tiles split K over clusters where the tiles leave SMs idle: a CTA runs 1 / split of
    # the steps, then the cluster sums its partial tiles (a DSMEM load per CTA and element).
    split = _cuda_packed_split(tiles, chunks, p.gpu["sms"]) if t.patch else 1
    ctas = tiles * split
    tile_pixels = 2048 // t.rows
    per_thread = steps * CUDA_TC_PACKED_STEP_OPS[(t.rows, t.patch)][_dtype_name(p.case)]
    xp = g.n * padded * c_pad * g.esize
    if t.patch:
        setup = CUDA_PATCH_SETUP_OPS[t.rows][_dtype_name(p.case)]
        per_pass = 256 // (32 * g.esize // 16)  # patch pixels one trip copies
        per_thread += chunks * (setup + math.ceil(t.patch_pixels / per_pass) * CUDA_PATCH_TRIP_OPS)
        x_l2 = tiles * t.patch_pixels * c_pad * g.esize
        # the warps' 16-pixel blocks that hold a pixel of a tile
        pixel_work = groups * math.ceil(t.out_rows * side / 16) * 16 / g.n
    else:
        x_l2 = tiles * steps * tile_pixels * 32 * g.esize
        pixel_work = math.ceil(g.pixels / 16) * 16
    reduce_ops = tiles * t.rows * tile_pixels * (2 * split + 4) if split > 1 else 0
    w_kept = g.weight * out_work / g.c * c_pad / g.c  # wp's kept rows
    chain = (steps / split * (p.lat("l2") / (CUDA_PACKED_STAGES - 1) + p.lat("barrier"))
             + p.lat("dram") + (p.lat("cluster_pass") if split > 1 else 0.0))
    name = "masked_conv2d_tc_packed_kernel (mma" + (", patch tiles" if t.patch else "") + (
        f", K split {split})" if split > 1 else ")")
    p.kernel(name, "inner",
             hbm=xp + g.x + wp,
             l2=max(0.0, x_l2 - xp) + w_kept * (groups - 1),
             flops=g.flops(math.ceil(out_work / 16) * 16, c_pad, pixel_work),
             tensor=True, eff=p.gpu["cuda_wmma_eff"],
             ops=tiles * 256 * per_thread + reduce_ops, ctas=ctas, per_sm=t.per_sm,
             chain_us=chain)


def _cuda_gathering(p: Plan, g: _Conv, out_work: int, in_work: float) -> None:
    """masked_conv2d_tc_kernel, the per-sample path with a bool in_mask (tensor cores: bf16 /
    fp16, float32 under TF32, the benchmark's default): grid (pixel tiles of 32, channel tiles
    of 64, samples), 256 threads, 2 CTAs an SM (128 registers); the tiles past the kept
    channels only write their zeros, a warp skips rows past the kept ones and pixels past the
    image (16 at a time). A CTA's chain: one K step of 64 (kernel position, kept input channel)
    pairs after another, each the next step's gathers (x and weight hit L2 after the first tile
    reads them) in flight over the mma, then the shared stores to the other of two stages and
    one barrier. Issue: CUDA_TC_STEP_OPS lane instructions a thread a step, counted in the sm_90
    SASS."""
    tiles = math.ceil(out_work / 64)
    p_tiles = math.ceil(g.pixels / 32)
    rows = math.ceil(out_work / 16) * 16
    pixels = math.ceil(g.pixels / 16) * 16
    steps = math.ceil(in_work * 9 / 64)
    ctas = g.n * p_tiles * tiles
    chain = steps * (p.lat("l2") + p.lat("barrier") + p.lat("smem")) + p.lat("dram")
    # The weight rows of the tile's kept output channels, columns of the kept input channels.
    w_tile = g.weight * out_work / g.c * in_work / g.c
    p.kernel("masked_conv2d_tc_kernel (wmma)", "inner", hbm=2 * g.x + g.weight + g.c * g.esize,
             l2=g.x * in_work / g.c * (tiles - 1) + w_tile * (g.n * p_tiles - 1),
             flops=g.flops(rows, in_work, pixels), tensor=True, eff=p.gpu["cuda_wmma_eff"],
             ops=ctas * steps * 256 * CUDA_TC_STEP_OPS[_dtype_name(p.case)], ctas=ctas, per_sm=2,
             chain_us=chain)


CUDA_STATIC_PACKED_MAX_STEPS = 144  # csrc/cuda/masked_conv.cu's kStaticPackedMaxSteps


def _cuda_static_packed(p: Plan, g: _Conv, out_kept: int, in_kept: int) -> bool:
    """masked_conv.cu's static_on_tensor_cores: static masks run the packed path (pack_kernel,
    a bool in_mask's kept channels first, then masked_conv2d_tc_packed_kernel) where its CTAs
    (_cuda_packed_tiling's pixel tiles x row tiles of the kept output channels, before any K
    split) times the K steps each runs (9 taps x ceil(in_kept / 32)) over the rounds of the
    GPU's CTA slots (4 an SM) stay within CUDA_STATIC_PACKED_MAX_STEPS, else cuDNN on the
    compacted problem. The limit is this model's, with cuDNN's float32 times as the H200 run
    measured them (CUDNN_*): over 3 x 3 convolutions of 1-128 samples, 32-512 channels, 4 x 4
    to 56 x 56 maps and 25-75% kept, the path it chooses takes on average 0.4% (in_mask) / 0.6%
    (out_mask alone) more predicted time than the faster one with patch tiles (144 is the best
    limit for out_masks; 288 would save 0.1% for in_masks). (With cuDNN at 200 TFLOP/s and no
    transposes the limits were 18 and 9: most static out_masks went to cuDNN, whose measured
    floor then made them miss their goal.)"""
    rounds = math.ceil(_cuda_packed_tiling(g, True).ctas(g.n, out_kept) / (p.gpu["sms"] * 4))
    return rounds * 9 * math.ceil(in_kept / 32) <= CUDA_STATIC_PACKED_MAX_STEPS


def _triton_channel_lists(p: Plan, mask: bool) -> None:
    """_kept_first of one per-sample mask on the unpacked path: a stable sort of the bool mask
    (the kernel counts the kept channels itself); nothing for None or a mask shared by the
    batch (its list is cached per mask version, _MaskCache)."""
    if mask:
        p.kernel("channel list: sort", "aten", hbm=p.case.shape[0] * p.case.shape[1] * 9)


# _masked_conv2d_forward_kernel's step (a tap and a chunk of BLOCK_CI input channels: the im2col
# and weight tiles' loads, issued num_stages ahead, and the tl.dot) in the sm_90 SASS, lane
# instructions a thread, by (block-sparse, listed input channels, BLOCK_P, BLOCK_CO) and element
# size (float32 under TF32, or the 16-bit type): the configurations the benchmarks take (make
# gpu-report recounts them in the SASS and fails where these differ by more than
# STEP_OPS_TOLERANCE). A listed step is one trip of the tap loop inside a chunk's loop.
TRITON_CONV_STEP_OPS = {
    (False, False, 64, 16): {"float32": 278, "bfloat16": 203, "float16": 203},
    (False, False, 64, 32): {"float32": 186, "bfloat16": 150, "float16": 150},
    (False, False, 64, 64): {"float32": 144, "bfloat16": 109, "float16": 109},
    (False, False, 64, 128): {"float32": 182, "bfloat16": 152, "float16": 152},
    (False, False, 128, 32): {"float32": 174, "bfloat16": 142, "float16": 142},
    (False, False, 128, 64): {"float32": 201, "bfloat16": 160, "float16": 160},
    (False, True, 64, 32): {"float32": 170, "bfloat16": 129, "float16": 129},
    (False, True, 64, 64): {"float32": 126, "bfloat16": 100, "float16": 100},
    (False, True, 64, 128): {"float32": 163, "bfloat16": 139, "float16": 139},
    (False, True, 128, 64): {"float32": 177, "bfloat16": 147, "float16": 147},
}
# The PACKED path's step (x and the weight laid out by _pack_kernel: unmasked copies, 8-byte
# ones for x and 16-byte ones for the weight, no gathers), sm_90 SASS at its own warp counts
# (triton_conv_config packed), by (BLOCK_P, BLOCK_CO) and element size (float32 under TF32, or
# the 16-bit type).
TRITON_CONV_PACKED_STEP_OPS = {
    (64, 16): {"float32": 83, "bfloat16": 70, "float16": 70},
    (64, 32): {"float32": 88, "bfloat16": 71, "float16": 71},
    (64, 64): {"float32": 79, "bfloat16": 68, "float16": 68},
    (64, 128): {"float32": 77, "bfloat16": 69, "float16": 69},
    (128, 32): {"float32": 85, "bfloat16": 72, "float16": 72},
    (128, 64): {"float32": 79, "bfloat16": 70, "float16": 70},
}
# The weight-mask path's step, packed (x and the masked weight laid out by _pack_kernel: the
# same unmasked copies, no mask tile; the step's (channel block, kh, kw) entry taken from the
# group of list entries held in registers, a block reduction, and its bit fields by shifts and
# masks), sm_90 SASS at 4 warps, by (BLOCK_P, BLOCK_CO) and element size. (The entry split by
# two divisions instead took 144 float32 / 130 16-bit instructions at 128 x 16. Unpacked,
# gathering x and loading the mask's tile beside the weight's: 179 float32 and 125 16-bit
# lane instructions a step at 128 x 16 and 8 warps.)
TRITON_CONV_SPARSE_PACKED_STEP_OPS = {
    (16, 16): {"float32": 57, "bfloat16": 54, "float16": 54},
    (32, 16): {"float32": 60, "bfloat16": 57, "float16": 57},
    (64, 16): {"float32": 77, "bfloat16": 65, "float16": 65},
    (128, 16): {"float32": 89, "bfloat16": 78, "float16": 78},
}
# _pack_kernel: lane instructions an element of its tiles (128 pixels by 32 channels in 4
# warps: the float pixel-row quotient, a 4-byte gather, the transpose through shared memory,
# 16-byte stores; sm_90 SASS, ~750 a thread of 32 elements) and its CTAs an SM (121 registers).
TRITON_PACK_OPS = 23
TRITON_PACK_PER_SM = 4
# With a weight mask, the finiteness flag of each tile of x (v - v == 0 an element, then a
# reduction over the tile): 176 instructions more in the float32 kernel's SASS, for the 32
# elements a thread of a tile holds (125 registers: still 4 CTAs an SM).
TRITON_PACK_FINITE_OPS = 5.5
# Listed input channels: the instructions a thread of a chunk's loop outside its tap loop (the
# chunk's channel list, the pipeline's prologue and drain), sm_90 SASS of the float32 variants
# (180-280), and the latency of one refill of the pipeline a chunk.
TRITON_CONV_CHUNK_OPS = {(64, 32): 272, (64, 64): 180, (64, 128): 272, (128, 64): 280}


@functools.lru_cache(maxsize=None)
def triton_patch_pixels(ranges: int, span: int, side: int, block_p: int) -> int:
    """The xp pixels the packed Triton kernel's pixel tiles read, summed over the tiles: a
    tile's 9 taps (3x3, stride 1, padding 1) of its block_p pixels of a range of `span` output
    pixels (one sample's side x side map, or the batch's where a tile spans samples), each xp
    pixel counted once a tile (the taps of a chunk run back to back, the later ones from L1)."""
    padded = side + 2
    tiles = math.ceil(span / block_p)
    pix = np.minimum(np.arange(tiles * block_p), span - 1).reshape(tiles, block_p)
    sample, q = np.divmod(pix, side * side)
    oh, ow = np.divmod(q, side)
    taps = np.array([kh * padded + kw for kh in range(3) for kw in range(3)])
    ids = (sample * padded * padded + oh * padded + ow)[:, :, None] + taps[None, None, :]
    ids = np.sort(ids.reshape(tiles, -1), axis=1)
    return ranges * int((1 + np.count_nonzero(np.diff(ids, axis=1), axis=1)).sum())


def _triton_pack(p: Plan, g: _Conv, in_kept: int, ci_work: int, rows: int = 0,
                 weight_mask: bool = False) -> float:
    """_pack_kernel, one launch inside the launcher: the kept channels of x read once, xp
    written (padding 1: (H + 2) x (W + 2) pixels, ci_work channels), the weight's kept channels
    likewise (with a weight mask, its bytes read too, and each tile of x flagged finite or
    not); its tiles cover 128 padded pixels of a sample (or of the weight's (C_out, 9) image)
    by 32 channels. rows: per-sample out_mask rows whose kept-first lists it writes (a program
    a row: a count, then a cumsum and a scatter a block of 256 channels). Returns xp's
    bytes."""
    side = math.isqrt(g.pixels)
    padded = (side + 2) ** 2
    xp = g.n * padded * ci_work * g.esize
    w_packed = g.c * 9 * ci_work * g.esize
    x_pix = g.n * math.ceil(padded / 128)  # x's pixel blocks
    x_tiles = x_pix * math.ceil(ci_work / 32)
    lanes = (x_pix + math.ceil(g.c * 9 / 128)) * 128 * ci_work
    mask_bytes = g.weight / g.esize + x_tiles * 4 if weight_mask else 0.0  # and the flags
    check_ops = x_tiles * 128 * 32 * TRITON_PACK_FINITE_OPS if weight_mask else 0.0
    p.host("triton")
    p.kernel("_pack_kernel", "inner",
             hbm=g.x * in_kept / g.c + xp + g.weight * in_kept / g.c + mask_bytes + w_packed
             + rows * g.c * 9,
             ops=lanes * TRITON_PACK_OPS + check_ops + rows * g.c * 12,
             ctas=lanes // (128 * 32) + rows,
             per_sm=TRITON_PACK_PER_SM, chain_us=p.lat("l2") + p.lat("dram"))
    return xp


def _triton_conv(p: Plan, g: _Conv, out_kept: int, in_kept: int, per_sample: bool,
                 out_mask: bool, in_mask: bool, xp: float | None = None,
                 gated: tuple[int, int] | None = None) -> None:
    """_masked_conv2d_forward_kernel with channel lists: work padded to the blocks, on the
    tensor cores (TF32 for float32: cudnn.allow_tf32, PyTorch's default, which the benchmark
    keeps); the output-channel blocks past the kept count store zeros only. Masks shared by
    the batch: pixel tiles over the batch's N * H * W pixels; per-sample masks: a sample's.
    Packed (all but per-sample input masks): _pack_kernel first, then each working program
    runs 9 * ceil(in_kept / BLOCK_CI) steps of TRITON_CONV_PACKED_STEP_OPS lane instructions a
    thread over xp. Unpacked: TRITON_CONV_STEP_OPS a step; with an input mask (listed
    channels), a chunk's loop around 9 steps adds TRITON_CONV_CHUNK_OPS and one pipeline
    refill. xp, gated: a weight mask's launch that runs its dense programs (GATED), after the
    caller's pack (xp's bytes), in the tiles of the block-sparse launch's grid (its programs,
    whose count is gated[1]; those past the dense grid return at once) at 4 warps, gated[0]
    pixels a tile (triton_gated_dense_tile)."""
    ranges = g.n if per_sample else 1
    span = g.pixels * g.n // ranges
    packed = not (in_mask and per_sample)
    block_p, block_co, block_ci, warps = triton_conv_config(g.c, span, ranges, out_mask,
                                                            packed=packed)
    if gated:
        (block_p, block_co), block_ci, warps = triton_gated_dense_tile(gated[0]), 32, 4
    _triton_channel_lists(p, in_mask and per_sample)
    _triton_channel_lists(p, out_mask and per_sample and not packed)  # packed: the pack orders
    co_work = math.ceil(out_kept / block_co) * block_co
    ci_work = math.ceil(in_kept / block_ci) * block_ci
    p_work = math.ceil(span / block_p) * block_p * ranges / g.n  # pixels a sample, padded
    active = ranges * math.ceil(span / block_p) * math.ceil(out_kept / block_co)
    chunks = ci_work // block_ci
    dtype = _dtype_name(p.case)
    x_read = g.x
    chain = 0.0
    if packed:
        # A per-sample out_mask: the packing launch writes its rows' kept-first lists.
        x_read = xp if xp is not None else _triton_pack(p, g, in_kept, ci_work,
                                                        g.n if out_mask and per_sample else 0)
        per_thread = 9 * chunks * TRITON_CONV_PACKED_STEP_OPS[(block_p, block_co)][dtype]
    else:
        per_thread = 9 * chunks * TRITON_CONV_STEP_OPS[(False, in_mask, block_p, block_co)][dtype]
        if in_mask:
            per_thread += chunks * TRITON_CONV_CHUNK_OPS[(block_p, block_co)]
            chain = chunks * (p.lat("l2") + 2 * p.lat("barrier"))
    # L2: every working program copies its BLOCK_P x BLOCK_CI tile of x at each of the 9 taps
    # of each chunk, and its BLOCK_CO weight rows over the whole reduction; the first read of
    # each is HBM. Packed, a chunk's taps run back to back and copy x in 8-byte cp.async.ca
    # (LDGSTS.E.64 in the SASS: they fill L1, where 16-byte copies bypass it), so a program
    # reads its tile's patch of xp (triton_patch_pixels) from L2 once a chunk and the other
    # taps' shifted tiles from L1: a patch is <= ~20 KB a program (e.g. 6 padded rows of 18
    # pixels x 128 B), 16 / warps programs an SM, well inside the L1 left beside their stages.
    if packed:
        x_tiles = (math.ceil(out_kept / block_co) * chunks * block_ci * g.esize
                   * triton_patch_pixels(ranges, span, math.isqrt(g.pixels), block_p))
    else:
        x_tiles = active * 9 * chunks * block_p * block_ci * g.esize
    w_tiles = active * block_co * 9 * ci_work * g.esize
    p.host("triton")
    p.kernel("_masked_conv2d_forward_kernel (tensor cores" + (", GATED dense)" if gated else ")"),
             "inner",
             hbm=x_read + g.x + g.weight,
             l2=max(0.0, x_tiles - x_read) + max(0.0, w_tiles - g.weight * ci_work / g.c),
             flops=g.flops(co_work, ci_work, p_work), tensor=True,
             eff=p.gpu["triton_tc_eff" if block_p >= 64 else "triton_tc16_eff"],
             ops=active * 32 * warps * per_thread, ctas=max(active, gated[1]) if gated else active,
             per_sm=16 // warps, chain_us=chain)


def _triton_sparse(p: Plan, g: _Conv) -> None:
    """The weight-mask path, packed: _pack_kernel (xp, and wp holding the mask's zeros; its
    tiles of x flagged finite or not, for the samples that must run every tile), then one
    launch (GATED) whose programs run, as the mask's gated counts say, the block-sparse kernel
    over the occupied 16x16 (output, input channel) tiles of each tap, on the tensor cores,
    where at most TRITON_SPARSE_MAX_SHARE of the tiles keep a weight (or the tiles are under
    128 pixels), else the dense kernel on wp (_triton_conv, gated). The mask's block table is
    built once per mask version (_MaskCache): a benchmark's static mask costs no launch a
    call."""
    tile = TRITON_WEIGHT_MASK_BLOCK
    occupied = (1 - (1 - g.keep) ** (tile * tile)) if g.kind == "w" else g.keep
    ci_blocks = math.ceil(g.c / tile)
    xp = _triton_pack(p, g, g.c, math.ceil(g.c / 32) * 32, weight_mask=True)
    span = g.n * g.pixels  # no per-sample mask: pixel tiles over the batch
    block_p, _, _, warps = triton_conv_config(g.c, span, 1, sparse=True, packed=True)
    co_blocks = math.ceil(g.c / tile)
    # 16 output channels a program: the x tile is reread per output block, the MMA is narrow.
    ctas = math.ceil(span / block_p) * co_blocks
    if occupied > TRITON_SPARSE_MAX_SHARE and triton_gated_dense_tile(block_p):
        _triton_conv(p, g, g.c, g.c, False, False, False, xp=xp, gated=(block_p, ctas))
        return
    p.host("triton")
    p_work = math.ceil(span / block_p) * block_p / g.n
    steps = 9 * ci_blocks * occupied  # the occupied (16-channel block, tap) tiles
    # L2: a channel block's taps run back to back and copy x in 8-byte cp.async.ca (as the
    # dense packed path), so each program reads its tile's patch of xp from L2 once an occupied
    # channel block and the other taps' shifted tiles from L1; its 16 x 16 weight tiles once.
    x_tiles = (co_blocks * ci_blocks * occupied * tile * g.esize
               * triton_patch_pixels(1, span, math.isqrt(g.pixels), block_p))
    w_tiles = ctas * steps * tile * tile * g.esize
    p.kernel("_masked_conv2d_forward_kernel (block-sparse, packed, tensor cores)", "inner",
             hbm=xp + g.x + g.weight * occupied,
             l2=max(0.0, x_tiles - xp) + max(0.0, w_tiles - g.weight * occupied),
             flops=g.flops(g.c, g.c, p_work) * occupied, tensor=True,
             eff=p.gpu["triton_tc16_eff"],
             ops=ctas * steps * 32 * warps
             * TRITON_CONV_SPARSE_PACKED_STEP_OPS[(block_p, tile)][_dtype_name(p.case)],
             ctas=ctas, per_sm=16 // warps)


def _fold_weight_mask(p: Plan, g: _Conv) -> None:
    """ops.masked_conv._keep on a GPU weight: torch.where with a scalar zero, one launch (the
    weight and the mask's bytes read, the folded weight written), with or without autograd."""
    p.kernel("weight mask: where", "aten", hbm=2 * g.weight + g.weight / g.esize)


def masked_conv_forward(p: Plan, provider: str, grad: bool) -> None:
    case = p.case
    g = _conv_shape(case)
    out_static = g.kind == "out"
    if provider == EAGER:
        if g.kind == "in":
            p.kernel("in_mask.to", "aten", hbm=g.c * 5)
            p.kernel("x * in_mask", "aten", hbm=2 * g.x)
        if g.kind in ("w", "b"):
            p.kernel("weight_mask.to", "aten", hbm=g.weight * 5 / 4)
            p.kernel("weight * weight_mask", "aten", hbm=3 * g.weight)
        _cudnn_forward(p, g, g.c, g.c)
        if g.kind in ("out", "sample-out"):
            p.kernel("out_mask.to", "aten", hbm=g.n * g.c * 5)
            p.kernel("y * out_mask", "aten", hbm=2 * g.x)
    elif provider == COMPILE:
        _compiled(p, grad)
        if g.kind == "in":
            p.kernel("fused x * in_mask", "compiled_launch", hbm=2 * g.x)
        if g.kind in ("w", "b"):
            p.kernel("fused weight * weight_mask", "compiled_launch", hbm=g.weight * 9 / 4)
        _cudnn_forward(p, g, g.c, g.c, issue="compiled_launch")
        if g.kind in ("out", "sample-out"):
            p.kernel("fused y * out_mask", "compiled_launch", hbm=2 * g.x)
    elif provider == CUDA:
        _pyprune(p, "masked_conv", grad)
        if g.kind == "dense":
            _cudnn_forward(p, g, g.c, g.c)
        elif g.kind in ("w", "b"):
            _fold_weight_mask(p, g)
            _cudnn_forward(p, g, g.c, g.c)
        elif g.kind == "sample-out":
            _cuda_packed(p, g, g.kept, shared=False)
        elif _cuda_static_packed(p, g, g.kept if out_static else g.c,
                                 g.kept if g.kind == "in" else g.c):
            # the (C,) out_mask read on the device; the kept counts and an in_mask's kept list
            # from the cache
            _cuda_packed(p, g, g.kept if out_static else g.c, g.kept if g.kind == "in" else g.c)
        else:  # static masks: compacted weight (and x), cuDNN; the kept indices come from the
            # per-mask-version cache (a nonzero sync on the first call only)
            p.kernel("index_select weight", "inner", hbm=2 * g.weight * g.keep)
            if out_static:  # static_forward_cuda: no bias in cuDNN, one fused pass
                # writes the kept channels with their bias and the zeros (was: bias gather, bias
                # add, zeros, index_copy_: 6 launches, now 3)
                out = g.x * g.keep
                _cudnn_fprop(p, g.flops(g.kept, g.c), g.x, g.weight * g.keep, out, "cudnn")
                rows = g.n * g.c
                p.kernel("scatter_kept_channels_kernel", "inner", hbm=out + g.x,
                         ops=g.n * g.c * g.pixels * 4, ctas=min(math.ceil(rows / 8), 132 * 8),
                         per_sm=8, chain_us=p.lat("block_scan") + p.lat("dram"))
            else:
                p.kernel("index_select x", "inner", hbm=2 * g.x * g.keep)
                _cudnn_forward(p, g, g.c, g.kept, issue="cudnn")
    elif provider == TRITON:
        _pyprune(p, "masked_conv", grad)
        if g.kind in ("w", "b"):
            _triton_sparse(p, g)
        else:
            out_kept = g.kept if g.kind in ("out", "sample-out") else g.c
            in_kept = g.kept if g.kind == "in" else g.c
            _triton_conv(p, g, out_kept, in_kept, g.kind == "sample-out",
                         g.kind in ("out", "sample-out"), g.kind == "in")
    else:
        raise ValueError(f"masked_conv: no model for provider {provider!r}")


def masked_conv_backward(p: Plan, provider: str) -> None:
    case = p.case
    g = _conv_shape(case)
    if provider in (EAGER, COMPILE):
        fused = provider == COMPILE
        issue = "compiled_launch" if fused else "inner"
        if fused:
            p.host("compiled_backward")
        if g.kind in ("out", "sample-out"):
            p.kernel("grad * out_mask", issue, hbm=2 * g.x)
        _cudnn_backward(p, g, g.c, g.c)
        if g.kind == "in":
            p.kernel("grad_x * in_mask", issue, hbm=2 * g.x)
        if g.kind in ("w", "b"):
            p.kernel("grad_weight * weight_mask", issue, hbm=3 * g.weight)
    elif provider == CUDA:
        if g.kind not in ("dense", "w", "b"):  # the op's Python backward (else F.conv2d's)
            p.host("pyprune_backward", "masked_conv")
        if g.kind == "dense":
            _cudnn_backward(p, g, g.c, g.c)
        elif g.kind in ("w", "b"):
            _cudnn_backward(p, g, g.c, g.c)
            p.kernel("where backward (weight mask)", "inner", hbm=3 * g.weight)
        elif g.kind == "sample-out":  # grad_x: the kernel on the flipped weight; wgrad dense
            p.kernel("flip weight", "inner", hbm=2 * g.weight)
            _cuda_gathering(p, g, g.c, g.kept)  # the out_mask as its in_mask
            p.kernel("where(out_mask, grad)", "inner", hbm=2 * g.x)
            _cudnn_backward(p, g, g.c, g.c, dgrad=False)
        else:  # static_backward (the mask's kept indices cached, the other side's an arange)
            p.kernel("kept: arange", "inner", hbm=g.c * 8)
            p.kernel("zeros (grad_bias)", "inner", hbm=g.c * g.esize)
            if g.kind == "out":
                p.kernel("index_select grad", "inner", hbm=2 * g.x * g.keep)
                p.kernel("sum (grad_bias)", "inner", hbm=g.x * g.keep)
                p.kernel("index_copy_ (grad_bias)", "inner", hbm=g.c * g.esize)
                p.kernel("index_select weight", "inner", hbm=2 * g.weight * g.keep)
                _cudnn_backward(p, g, g.kept, g.c, bias=False)
            else:
                p.kernel("sum (grad_bias)", "inner", hbm=g.x)
                p.kernel("index_copy_ (grad_bias)", "inner", hbm=g.c * g.esize)
                p.kernel("index_select x", "inner", hbm=2 * g.x * g.keep)
                p.kernel("index_select weight", "inner", hbm=2 * g.weight * g.keep)
                _cudnn_backward(p, g, g.c, g.kept, bias=False)
                p.kernel("zeros_like x", "inner", hbm=g.x)
                p.kernel("index_copy_ grad_x", "inner", hbm=2 * g.x * g.keep)
            p.kernel("zeros_like weight", "inner", hbm=g.weight)
            p.kernel("index_put_ grad_weight", "inner", hbm=2 * g.weight * g.keep)
    elif provider == TRITON:
        p.host("pyprune_backward", "masked_conv")
        if g.kind in ("w", "b"):  # sparse_conv2d_backward: wgrad dense, grad_x block-sparse
            _cudnn_backward(p, g, g.c, g.c, dgrad=False, bias=False)
            # The packing reads the weight's and the mask's taps in reverse: no flipped copies.
            _triton_sparse(p, g)
            p.kernel("where(mask, grad_weight)", "aten", hbm=3 * g.weight)
            p.kernel("bias grad: sum", "aten", hbm=g.x)
        else:  # masked_conv2d_backward: wgrad dense on the masked tensors, grad_x transposed
            if g.kind in ("out", "sample-out"):
                p.kernel("where(out_mask, grad)", "aten", hbm=2 * g.x)
            if g.kind == "in":
                p.kernel("where(in_mask, x)", "aten", hbm=2 * g.x)
            _cudnn_backward(p, g, g.c, g.c, dgrad=False, bias=False)
            if g.kind == "sample-out":  # unpacked (a per-sample in_mask): a flipped copy;
                # packed, the packing reads the weight's taps in reverse
                p.kernel("flip weight", "aten", hbm=2 * g.weight)
            # Transposed: the reduction runs over the forward's kept output channels.
            reduce_kept = g.kept if g.kind in ("out", "sample-out") else g.c
            out_kept = g.kept if g.kind == "in" else g.c
            _triton_conv(p, g, out_kept, reduce_kept, g.kind == "sample-out", g.kind == "in",
                         g.kind in ("out", "sample-out"))
            p.kernel("bias grad: sum", "aten", hbm=g.x)
    else:
        raise ValueError(f"masked_conv: no model for provider {provider!r}")


def masked_conv_compulsory(case: Case, mode: str) -> tuple[float, float]:
    g = _conv_shape(case)
    kept = {"out": (g.keep, 1.0), "sample-out": (g.keep, 1.0), "in": (1.0, g.keep)}
    k_out, k_in = kept.get(g.kind, (1.0, 1.0))
    flops = g.flops(g.c * k_out, g.c * k_in) * (g.keep if g.kind in ("w", "b") else 1.0)
    forward = (g.x * k_in + g.weight + g.x, flops)
    backward = (2 * g.x + 2 * g.weight + g.x, 2 * flops)  # grad, x, w -> grad_x, grad_w
    if mode == "forward":
        return forward
    if mode == "backward":
        return backward
    return forward[0] + backward[0], forward[1] + backward[1]


# ---------------------------------------------------------------------------------------------
# Predictions.

MODELS: dict[str, tuple[Callable, Callable, Callable]] = {
    "kwta": (kwta_forward, kwta_backward, kwta_compulsory),
    "sap": (sap_forward, sap_backward, sap_compulsory),
    "noise": (noise_forward, noise_backward, noise_compulsory),
    "cas": (cas_forward, cas_backward, cas_compulsory),
    "masked_conv": (masked_conv_forward, masked_conv_backward, masked_conv_compulsory),
}


def plan(op: str, case: Case, provider: str, mode: str, gpu: str) -> Plan:
    """The items of one timed call of the benchmark (op, case, provider, mode) on gpu."""
    if op not in MODELS:
        raise ValueError(f"no roofline model for op {op!r}; add one to benchmarks/roofline.py")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    forward, backward, _ = MODELS[op]
    p = Plan(GPUS[gpu], case, provider)
    if mode in ("forward", "full"):
        forward(p, provider, grad=mode == "full")
    if mode in ("backward", "full"):
        p.host("autograd")
        backward(p, provider)
    return p


@dataclass(frozen=True)
class Prediction:
    op: str
    case: str
    mode: str
    provider: str
    dtype: str
    hbm_bytes: float
    l2_bytes: float
    flops: float
    ops: float
    launches: int
    syncs: int
    lower_bound_us: float
    device_us: float
    predicted_us: float
    bound: str


def predict_case(op: str, case: Case, mode: str, gpu: str) -> dict[str, Prediction]:
    """Every provider's prediction for one (op, case, mode), timed together as the harness
    times them (interleaved)."""
    constants, dtype = GPUS[gpu], _dtype(case)
    plans = {provider: plan(op, case, provider, mode, gpu) for provider in PROVIDERS}
    measured = dict(zip(plans, simulate([p.items for p in plans.values()], constants, dtype)))
    nbytes, flops = MODELS[op][2](case, mode)
    lower = max(nbytes / (constants["copy_gbps"] * 1e3),
                flops / (constants["tensor_tflops"][dtype] * 1e6))
    out = {}
    for provider, p in plans.items():
        kernels = [i for i in p.items if isinstance(i, Kernel)]
        times = [kernel_time(k, constants, dtype) for k in kernels]
        device = sum(t for t, _ in times)
        if measured[provider] > device + 1.0:
            bound = "host"
        elif not kernels:
            bound = "none"
        else:
            t, term = max(times)
            bound = "launch" if t < 2 * constants["kernel_us"] else term
        out[provider] = Prediction(
            op=op, case=case.label, mode=mode, provider=provider, dtype=dtype,
            hbm_bytes=sum(k.hbm for k in kernels), l2_bytes=sum(k.l2 for k in kernels),
            flops=sum(k.flops for k in kernels), ops=sum(k.ops for k in kernels),
            launches=len(kernels), syncs=sum(isinstance(i, Sync) for i in p.items),
            lower_bound_us=lower, device_us=device, predicted_us=measured[provider],
            bound=bound,
        )
    return out


def predict(op: str, case: Case, provider: str, mode: str, gpu: str) -> Prediction:
    return predict_case(op, case, mode, gpu)[provider]


Goal = tuple[str, Callable[[dict], bool]]


def goal(op: str, case: Case, provider: str, mode: str) -> Goal | None:
    """The SPEC section 7 / issue 20 goal of a row, as text and a check on its ratios
    (``vs_eager``, ``vs_compile``, ``pct_copy``), or None."""
    if provider not in (CUDA, TRITON):
        return None
    if op == "kwta" and mode == "forward":
        x = 5.0 if case.shape[0] <= 32 else 3.0
        return f">= {x:g}x eager", lambda r: r["vs_eager"] >= x
    if op == "sap" and mode == "forward":
        if case.variant == "exact":
            return ">= 5x eager", lambda r: r["vs_eager"] >= 5.0
        return ">= 70% of copy", lambda r: r["pct_copy"] >= 70.0
    if op == "noise" and mode == "forward":
        return ">= 70% of copy", lambda r: r["pct_copy"] >= 70.0
    if op == "cas" and mode == "full":
        return ">= 1.3x torch.compile", lambda r: r["vs_compile"] >= 1.3
    if op == "masked_conv" and mode == "forward":
        kind = case.variant.rstrip("0123456789")
        if kind in ("out", "in"):
            x = 0.8 * conv_bench.ideal_speedup(case.variant)
            return f">= {x:.2f}x eager (80% of ideal)", lambda r: r["vs_eager"] >= x
        if case.variant == "sample-out25":
            return ">= 2x eager (dense)", lambda r: r["vs_eager"] >= 2.0
    return None


def floor_pct_copy(gpu: str, declared: float) -> float:
    """The largest share of the copy bandwidth (%) that any call moving ``declared`` bytes can
    show as the harness times it: an event pair around no device work still reads
    ``event_floor_us``. A "% of copy" goal above it cannot be met by any kernel there."""
    constants = GPUS[gpu]
    return 100 * declared / (constants["event_floor_us"] * 1e3) / constants["copy_gbps"]


COLUMNS = ("gpu", "op", "case", "mode", "provider", "dtype", "bytes", "l2_bytes", "flops", "ops",
           "launches", "syncs", "lower_bound_us", "device_us", "predicted_us",
           "predicted_eager_us", "predicted_compile_us", "predicted_speedup_vs_eager",
           "predicted_speedup_vs_compile", "declared_bytes", "predicted_pct_copy", "bound",
           "goal", "meets_goal")


def cases() -> list[tuple[str, Case]]:
    """Every (op, case) that ``python -m benchmarks --device cuda`` runs."""
    return [(op, case) for op, module in sorted(harness.discover_ops().items())
            for case in module.CASES]


def declared_bytes(op: str, case: Case) -> int:
    """The bytes the benchmark declares for the forward mode (its GB/s numerator), from the
    op's own setup on the CPU (building the inputs only)."""
    module = harness.discover_ops()[op]
    return harness.setup_of(op, module)(case, EAGER, "forward", torch.device("cpu")).bytes


def rows(gpu: str, with_declared: bool = True) -> list[dict]:
    """One dict per (op, case, mode, provider), COLUMNS as keys."""
    out = []
    copy = GPUS[gpu]["copy_gbps"]
    for op, case in cases():
        declared = declared_bytes(op, case) if with_declared else None
        for mode in MODES:
            preds = predict_case(op, case, mode, gpu)
            for prov, pr in preds.items():
                row = {
                    "gpu": gpu, "op": op, "case": pr.case, "mode": mode, "provider": prov,
                    "dtype": pr.dtype, "bytes": pr.hbm_bytes, "l2_bytes": pr.l2_bytes,
                    "flops": pr.flops, "ops": pr.ops, "launches": pr.launches,
                    "syncs": pr.syncs, "lower_bound_us": pr.lower_bound_us,
                    "device_us": pr.device_us, "predicted_us": pr.predicted_us,
                    "predicted_eager_us": preds[EAGER].predicted_us,
                    "predicted_compile_us": preds[COMPILE].predicted_us,
                    "predicted_speedup_vs_eager": preds[EAGER].predicted_us / pr.predicted_us,
                    "predicted_speedup_vs_compile": preds[COMPILE].predicted_us / pr.predicted_us,
                    "declared_bytes": "", "predicted_pct_copy": "", "bound": pr.bound,
                    "goal": "", "meets_goal": "",
                }
                if declared is not None and mode == "forward":
                    row["declared_bytes"] = declared
                    row["predicted_pct_copy"] = 100 * declared / (pr.predicted_us * 1e3) / copy
                target = goal(op, case, prov, mode)
                if target is not None:
                    row["goal"] = target[0]
                    ratios = {"vs_eager": row["predicted_speedup_vs_eager"],
                              "vs_compile": row["predicted_speedup_vs_compile"],
                              "pct_copy": row["predicted_pct_copy"] or 0.0}
                    row["meets_goal"] = "yes" if target[1](ratios) else "no"
                out.append(row)
    return out


def write_csv(path: Path, table: list[dict]) -> None:
    harness.write_table(path, COLUMNS, ([row[c] for c in COLUMNS] for row in table))


def explain(op: str, label: str, mode: str, provider: str, gpu: str) -> None:
    """Print the items of one call with each launch's device time and bound."""
    module = harness.discover_ops()[op]
    case = next((c for c in module.CASES if c.label == label), None)
    if case is None:
        raise SystemExit(f"{op} has no case {label!r}; cases: {[c.label for c in module.CASES]}")
    p = plan(op, case, provider, mode, gpu)
    dtype = _dtype(case)
    for item in p.items:
        if isinstance(item, Kernel):
            t, bound = kernel_time(item, p.gpu, dtype)
            print(f"  {t:9.2f} us device ({bound:<7}) {item.host_us:5.1f} us host  {item.name}: "
                  f"{item.hbm / 1e6:.2f} MB HBM, {item.l2 / 1e6:.2f} MB L2, "
                  f"{item.flops / 1e9:.3f} GFLOP, {item.ops / 1e9:.3f} G ops, "
                  f"CTAs {item.ctas or '-'}, "
                  f"chain {item.chain_us:.1f} us")
        else:
            print(f"  {type(item).__name__.lower()} {item.us:.1f} us")
    pr = predict(op, case, provider, mode, gpu)
    print(f"{op} {label} {mode} {provider} on {gpu}: device {pr.device_us:.1f} us, predicted "
          f"{pr.predicted_us:.1f} us ({pr.bound}), lower bound {pr.lower_bound_us:.1f} us")


def print_goals(table: list[dict]) -> None:
    print(f"{'op':<12} {'case':<22} {'mode':<8} {'provider':<15} {'pred us':>9} "
          f"{'vs eager':>8} {'vs comp':>8} {'% copy':>7}  goal")
    for r in table:
        if not r["goal"]:
            continue
        pct = f"{r['predicted_pct_copy']:.0f}%" if r["predicted_pct_copy"] != "" else ""
        print(f"{r['op']:<12} {r['case']:<22} {r['mode']:<8} {r['provider']:<15} "
              f"{r['predicted_us']:>9.1f} {r['predicted_speedup_vs_eager']:>7.2f}x "
              f"{r['predicted_speedup_vs_compile']:>7.2f}x {pct:>7}  {r['goal']}: "
              f"{'met' if r['meets_goal'] == 'yes' else 'MISSED'} ({r['bound']})")


# ---------------------------------------------------------------------------------------------
# The host's speed. The host_us figures were measured on the dev VM; the GPU machine's host
# may be slower (the H200 run measured eager's own small rows 3-10x over the model), and a
# call whose host time outgrows the harness's head start (the flush) turns host-bound.

# host_costs.csv (python -m benchmarks.host_overhead --launches) names measured directly as
# host_us entries; "harness" is harness_before + harness_after.
_MEASURED_HOST = ("aten", "triton", "counters")


def host_figures(gpu: str, scale: float = 1.0,
                 measured: dict[str, float] | None = None) -> dict:
    """gpu's ``host_us`` for another host. With ``measured`` (name -> us a call, from
    ``read_host_costs``): aten, triton and counters take the measured figures, harness_before
    and harness_after share the measured "harness" in the model's proportion, and every other
    entry (the Python of pyprune's calls, the autograd engine, torch.compile's wrappers, cuDNN's
    calls, the inner aten launches) scales by measured aten / the model's aten, the one figure
    of Python calling into ATen that both machines measure alike. Then every entry times
    ``scale`` (a sensitivity: how the predictions move with a slower host)."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    base = GPUS[gpu]["host_us"]
    speed = 1.0
    fixed: dict[str, float] = {}
    if measured:
        if "aten" not in measured:
            raise ValueError("measured host costs lack 'aten' (host_overhead --launches)")
        speed = measured["aten"] / base["aten"]
        fixed = {name: measured[name] for name in _MEASURED_HOST if name in measured}
        if "harness" in measured:
            around = base["harness_before"] + base["harness_after"]
            for name in ("harness_before", "harness_after"):
                fixed[name] = measured["harness"] * base[name] / around

    def entry(name: str, value):
        if isinstance(value, dict):
            return {k: v * speed * scale for k, v in value.items()}
        return fixed.get(name, value * speed) * scale

    return {name: entry(name, value) for name, value in base.items()}


def read_host_costs(path: Path) -> dict[str, float]:
    """{name: host us a call} of a ``python -m benchmarks.host_overhead --launches --out``
    CSV."""
    with path.open(newline="") as f:
        return {r["name"]: float(r["host_us_per_call"]) for r in csv.DictReader(f)}


@contextlib.contextmanager
def host_speed(gpu: str, scale: float = 1.0,
               measured: dict[str, float] | None = None) -> Iterator[dict]:
    """Inside, gpu's predictions take ``host_figures(gpu, scale, measured)``."""
    saved = GPUS[gpu]
    GPUS[gpu] = {**saved, "host_us": host_figures(gpu, scale, measured)}
    try:
        yield GPUS[gpu]["host_us"]
    finally:
        GPUS[gpu] = saved


def goals_met(table: list[dict]) -> tuple[int, int]:
    """(goals met, goal rows) of a ``rows`` table."""
    goal_rows = [r for r in table if r["goal"]]
    return sum(r["meets_goal"] == "yes" for r in goal_rows), len(goal_rows)


# ---------------------------------------------------------------------------------------------
# Measured beside predicted.


def gpu_of(device_name: str) -> str:
    """The GPUS key of a measured device name."""
    name = device_name.lower()
    for key in GPUS:
        if key in name:
            return key
    raise ValueError(f"no roofline constants for device {device_name!r}; known: {sorted(GPUS)}")


def _gpu_busy(path: Path) -> dict[tuple[str, str, str, str], float]:
    """(op, case, mode, provider) -> the GPU's busy microseconds a call, from a
    ``python -m benchmarks.kernel_times`` CSV (empty where there is none)."""
    if not path.exists():
        return {}
    with path.open(newline="") as f:
        return {(r["op"], r["shape"], r["mode"], r["provider"]): float(r["device_us_per_call"])
                for r in csv.DictReader(f) if r["kernel"] == "(all)"}


def compare(folder: Path, gpu: str | None, goals_only: bool = False, host_scale: float = 1.0,
            host_costs: Path | None = None) -> int:
    """Print every measured row of folder's op CSVs (only those with a goal if goals_only)
    beside its prediction; returns the number of measured rows without a prediction. The
    predictions take the host costs measured on that machine (``host_costs``, by default
    folder's host_costs.csv where the run wrote one: ``host_figures``), times host_scale."""
    measured = []
    for op in MODELS:
        path = folder / f"{op}.csv"
        if path.exists():
            measured += harness.read_csv(path)
    if not measured:
        print(f"no benchmark CSVs in {folder}", file=sys.stderr)
        return 1
    gpu = gpu or gpu_of(measured[0].device)
    copy = harness.copy_gbps_for(folder / "copy.csv", measured[0].device)
    ops = harness.discover_ops()
    by_label = {(op, c.label, _dtype(c)): c for op, module in ops.items() for c in module.CASES}
    eager = {(r.op, r.shape, r.dtype, r.mode): r.p50_ms for r in measured if r.provider == EAGER}
    compiled = {(r.op, r.shape, r.dtype, r.mode): r.p50_ms for r in measured
                if r.provider == COMPILE}
    busy = _gpu_busy(folder / "kernel_times.csv")
    costs_path = host_costs or folder / "host_costs.csv"
    costs = read_host_costs(costs_path) if costs_path.exists() else None
    dev_aten = GPUS[gpu]["host_us"]["aten"]
    with host_speed(gpu, host_scale, costs):
        if costs:
            print(f"host figures from {costs_path}: aten {costs['aten']:.1f} us a call, "
                  f"{costs['aten'] / dev_aten:.2f}x the dev VM's; the figures it does not "
                  "measure scaled alike" + (f"; all x{host_scale:g}" if host_scale != 1 else ""))
        elif host_scale != 1:
            print(f"host figures x{host_scale:g}")
        return _compare_rows(measured, gpu, copy, by_label, eager, compiled, busy, goals_only)


def _compare_rows(measured: list, gpu: str, copy: float | None, by_label: dict, eager: dict,
                  compiled: dict, busy: dict, goals_only: bool) -> int:
    print(f"measured ({measured[0].device}, copy {copy or float('nan'):.0f} GB/s) beside "
          f"predicted ({gpu}, copy {GPUS[gpu]['copy_gbps']:.0f} GB/s)"
          + ("; busy us: the GPU's busy time a call (kernel_times.csv)" if busy else ""))
    print(f"{'op':<12} {'case':<22} {'mode':<8} {'provider':<15} {'meas us':>9} {'pred us':>9} "
          f"{'meas/pred':>9} {'x eager':>8} {'(pred)':>7}  goal"
          + ("  | busy us  busy/dev  x eager (busy)" if busy else ""))
    missing, ratios, device_ratios = 0, [], []
    for r in measured:
        case = by_label.get((r.op, r.shape, r.dtype))
        if goals_only and (case is None or goal(r.op, case, r.provider, r.mode) is None):
            continue
        if case is None or r.provider not in PROVIDERS:
            missing += 1
            print(f"{r.op:<12} {r.shape:<22} {r.mode:<8} {r.provider:<15} {1e3 * r.p50_ms:>9.1f} "
                  f"{'no model':>9}")
            continue
        preds = predict_case(r.op, case, r.mode, gpu)
        pr = preds[r.provider]
        key = (r.op, r.shape, r.dtype, r.mode)
        pred_eager = preds[EAGER].predicted_us
        vs_eager = eager[key] / r.p50_ms if key in eager else float("nan")
        ratio = 1e3 * r.p50_ms / pr.predicted_us
        ratios.append(ratio)
        target = goal(r.op, case, r.provider, r.mode)
        verdict = ""
        if target is not None:
            checks = {"vs_eager": vs_eager,
                      "vs_compile": compiled[key] / r.p50_ms if key in compiled else float("nan"),
                      "pct_copy": 100 * r.gbps / copy if copy else float("nan")}
            verdict = f"{target[0]}: {'met' if target[1](checks) else 'MISSED'}"
        line = (f"{r.op:<12} {r.shape:<22} {r.mode:<8} {r.provider:<15} {1e3 * r.p50_ms:>9.1f} "
                f"{pr.predicted_us:>9.1f} {ratio:>9.2f} {vs_eager:>7.2f}x "
                f"{pred_eager / pr.predicted_us:>6.2f}x  {verdict}")
        if (r.op, r.shape, r.mode, r.provider) in busy:
            # The device alone: busy time against the model's device time (host left out).
            gpu_us = busy[(r.op, r.shape, r.mode, r.provider)]
            device_ratios.append(gpu_us / pr.device_us)
            line += f"  | {gpu_us:7.1f} {device_ratios[-1]:9.2f}"
            eager_busy = busy.get((r.op, r.shape, r.mode, EAGER))
            if eager_busy is not None:
                line += f"  {eager_busy / gpu_us:>13.2f}x"
        print(line)
    if ratios:
        print(f"measured / predicted: median {statistics.median(ratios):.2f}, "
              f"within 2x for {sum(0.5 <= q <= 2 for q in ratios)} of {len(ratios)} rows")
    if device_ratios:
        print(f"busy / predicted device time: median {statistics.median(device_ratios):.2f}, "
              f"within 2x for {sum(0.5 <= q <= 2 for q in device_ratios)} of "
              f"{len(device_ratios)} rows (the rest of measured / predicted is host time)")
    return missing


# ---------------------------------------------------------------------------------------------
# Batch sizes. The benchmark cases fix one batch size each; the GPU kernels are meant to fill
# the GPU at every batch size from 1 to 256 (small batches split a sample over programs).

SWEEP_BATCHES = (1, 2, 8, 32, 128, 256)


def batch_sweep(gpu: str, ops: list[str] | None = None, mode: str = "forward",
                batches: tuple[int, ...] = SWEEP_BATCHES) -> list[dict]:
    """Each benchmark case of ``ops`` (all by default) with its batch dimension set to each of
    ``batches``, for each pyprune provider: predicted us, the ratio to eager's prediction, and
    the launch with the fewest CTAs (its name and CTAs / SMs: below 1 a launch leaves SMs
    idle). A case the model cannot predict at a batch size (masked_conv's cuDNN times are the
    measured shapes') gives no row."""
    sms = GPUS[gpu]["sms"]
    out = []
    for op, module in harness.discover_ops().items():
        if ops and op not in ops:
            continue
        for case in module.CASES:
            for batch in batches:
                resized = dataclasses.replace(case, shape=(batch, *case.shape[1:]))
                try:
                    predictions = predict_case(op, resized, mode, gpu)
                except KeyError:
                    continue
                eager = predictions[EAGER].predicted_us
                for provider in (CUDA, TRITON):
                    pr = predictions[provider]
                    kernels = [k for k in plan(op, resized, provider, mode, gpu).items
                               if isinstance(k, Kernel) and k.ctas]
                    least = min(kernels, key=lambda k: k.ctas, default=None)
                    out.append({"op": op, "case": case.label, "batch": batch,
                                "provider": provider, "predicted_us": pr.predicted_us,
                                "vs_eager": eager / pr.predicted_us,
                                "fewest": least.name if least else "",
                                "fill": least.ctas / sms if least else float("nan")})
    return out


def print_batch_sweep(table: list[dict]) -> None:
    print(f"{'op':<12} {'case':<24} {'batch':>5} {'provider':<15} {'pred us':>8} "
          f"{'vs eager':>8}  fewest CTAs (/ SMs)")
    for r in table:
        fill = "" if r["fewest"] == "" else f"{r['fewest']} ({r['fill']:.2f})"
        print(f"{r['op']:<12} {r['case']:<24} {r['batch']:>5} {r['provider']:<15} "
              f"{r['predicted_us']:>8.1f} {r['vs_eager']:>7.2f}x  {fill}")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.roofline",
        description="Predict every GPU benchmark case from the bytes, FLOPs and serial latency "
                    "of the kernels' passes, or compare a measured run with the predictions.")
    parser.add_argument("--gpu", choices=sorted(GPUS), help="constants to predict with "
                        "(required without --compare; with it, default: the measured device)")
    parser.add_argument("--out", type=Path, help="CSV to write (default: "
                        "benchmarks/results/<gpu>-predicted.csv)")
    parser.add_argument("--compare", type=Path, metavar="DIR",
                        help="print the measured CSVs of DIR (python -m benchmarks --device cuda "
                        "output) beside the predictions instead of writing them")
    parser.add_argument("--goals", action="store_true",
                        help="with --compare: only the rows that have a goal")
    parser.add_argument("--host-scale", type=float, default=1.0, metavar="S",
                        help="every host figure times S: how the predictions move with a "
                        "slower host (default 1)")
    parser.add_argument("--host-costs", type=Path, metavar="CSV",
                        help="host figures measured on the GPU machine (python -m "
                        "benchmarks.host_overhead --launches --out CSV; --compare takes DIR's "
                        "host_costs.csv by default)")
    parser.add_argument("--explain", nargs=4, metavar=("OP", "CASE", "MODE", "PROVIDER"),
                        help="print the launches of one call, e.g. kwta 128x64x32x32 forward "
                        "pyprune-cuda")
    parser.add_argument("--batches", nargs="*", metavar="OP",
                        help="print every case of the ops (all without one) at batch sizes "
                        f"{', '.join(map(str, SWEEP_BATCHES))}, forward: the pyprune "
                        "providers' predictions, x eager, and each call's launch with the "
                        "fewest CTAs")
    args = parser.parse_args()
    if args.host_scale <= 0:
        parser.error(f"--host-scale must be > 0, got {args.host_scale}")
    if args.host_costs is not None and not args.host_costs.exists():
        parser.error(f"--host-costs: no file {args.host_costs}")
    if args.compare is not None:
        try:
            compare(args.compare, args.gpu, args.goals, args.host_scale, args.host_costs)
        except ValueError as e:  # a device without constants
            raise SystemExit(f"python -m benchmarks.roofline: {e}") from None
        return
    if args.gpu is None:
        parser.error("--gpu is required (or --compare DIR)")
    costs = read_host_costs(args.host_costs) if args.host_costs else None
    other_host = costs is not None or args.host_scale != 1
    if other_host and args.out is None and not args.explain and args.batches is None:
        # The stored predictions are the dev VM's host figures; others go elsewhere.
        parser.error("--host-scale / --host-costs: give --out (the stored predictions keep the "
                     "model's host figures)")
    with host_speed(args.gpu, args.host_scale, costs):
        if args.explain:
            explain(*args.explain, args.gpu)
            return
        if args.batches is not None:
            print_batch_sweep(batch_sweep(args.gpu, args.batches or None))
            return
        table = rows(args.gpu)
    path = args.out or harness.RESULTS / f"{args.gpu}-predicted.csv"
    write_csv(path, table)
    print_goals(table)
    met, total = goals_met(table)
    print(f"goals met: {met}/{total}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
