"""make gpu-report's arithmetic and parsers (benchmarks/gpu_report.py): the sm_90 occupancy model
on hand-computed cases, the cuobjdump parsers, the launch-bound check of the CUDA sources, and
what fails. The Triton compile itself is marked triton_aot."""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

from benchmarks import gpu_report
from benchmarks.gpu_report import Variant, occupancy

ROOT = Path(__file__).resolve().parent.parent


# (threads, registers, shared memory bytes) -> (blocks per SM, limiter), worked by hand from the
# sm_90 limits: 65536 registers in 4 sub-partitions, allocated per warp in units of 256; 64 warps,
# 32 blocks and 228 KB of shared memory per SM; 1 KB reserved per block, 128-byte granularity.
@pytest.mark.parametrize("threads, regs, smem, blocks, limiter", [
    # 64 regs: 2048 per warp, 8 warps per sub-partition, 32 per SM: 4 blocks of 8 warps (50%).
    (256, 64, 0, 4, "registers"),
    # 255 regs: 8160 -> 8192 per warp, 2 warps per sub-partition: 2 blocks of 4 warps (12.5%).
    (128, 255, 0, 2, "registers"),
    # 122 regs (kwta_warp_kernel<float>): 3904 -> 4096 per warp, 16 warps: 2 blocks of 8 (25%).
    (256, 122, 0, 2, "registers"),
    # 80 regs: 2560 per warp, 6 warps per sub-partition, 24 per SM: 3 blocks of 8 warps.
    (256, 80, 0, 3, "registers"),
    # 32 regs: 64 warps fit, so the warp limit binds first: 8 blocks of 8 warps (100%).
    (256, 32, 0, 8, "warps"),
    # One-warp blocks stop at 32 blocks per SM (50%).
    (32, 16, 0, 32, "blocks"),
    # 3 warps, 128 regs: 16 warps per SM fit, 5 blocks of 3 (15 warps, 23.4%).
    (96, 128, 0, 5, "registers"),
    # 100 KB + 1 KB reserved = 103424 B per block: 2 fit in 228 KB.
    (128, 32, 100 * 1024, 2, "shared memory"),
    # 33 KB + 1 KB: 34 KB a block (34816 B, a multiple of 128): 6 fit in 228 KB.
    (128, 32, 33 * 1024, 6, "shared memory"),
    # 1 B rounds up with the reservation to 1152 B: 202 blocks by shared memory, 16 by warps.
    (128, 32, 1, 16, "warps"),
    # 1024 threads, 64 regs: 65536 registers, the whole file: 1 block (50%).
    (1024, 64, 0, 1, "registers"),
    # 1024 threads, 65 regs: 2304 per warp x 32 warps > 65536: cannot launch.
    (1024, 65, 0, 0, "registers"),
    # More than 255 registers per thread cannot launch.
    (32, 256, 0, 0, "registers"),
    # 227 KB is the most a block may use; one byte more cannot launch.
    (128, 32, 227 * 1024, 1, "shared memory"),
    (128, 32, 227 * 1024 + 1, 0, "shared memory"),
])
def test_occupancy_hand_computed(threads, regs, smem, blocks, limiter):
    occ = occupancy(regs, threads, smem)
    warps = -(-threads // 32)
    assert (occ.blocks, occ.limiter) == (blocks, limiter)
    assert occ.warps == blocks * warps
    assert occ.fraction == pytest.approx(blocks * warps / 64)


def test_occupancy_fractions():
    assert occupancy(64, 256, 0).fraction == 0.5
    assert occupancy(255, 128, 0).fraction == 0.125
    assert occupancy(128, 128, 0).fraction == 0.25  # the 128-register budget is 25% exactly
    assert occupancy(129, 128, 0).fraction < 0.25
    assert occupancy(32, 96, 0).smem_per_block == 1024  # the reservation alone


def test_occupancy_rejects_bad_block_sizes():
    with pytest.raises(ValueError):
        occupancy(32, 0, 0)
    with pytest.raises(ValueError):
        occupancy(32, 1025, 0)


RESOURCE_USAGE = """
Fatbin elf code:
================
arch = sm_90
Resource usage:
 Common:
  GLOBAL:260 CONSTANT[4]:320
 Function _ZN7pyprune3fooIfEEvv:
  REG:64 STACK:0 SHARED:1128 LOCAL:0 CONSTANT[0]:704 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _kernel:
  REG:255 STACK:104 SHARED:1024 LOCAL:8 CONSTANT[0]:664 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

ELF = """
.nv.info._ZN7pyprune3fooIfEEvv
\t<0x13>
\tAttribute:\tEIATTR_MAX_THREADS
\tFormat:\tEIFMT_SVAL
\tValue:\t0x100 0x1 0x1 
\t<0x14>
\tAttribute:\tEIATTR_CRS_STACK_SIZE
\tFormat:\tEIFMT_SVAL
\tValue:\t0x0 

.nv.info._kernel
\tAttribute:\tEIATTR_REQNTID
\tFormat:\tEIFMT_SVAL
\tValue:\t0x80 0x1 0x1 

.nv.info._ZN7pyprune3barIfEEvv
\tAttribute:\tEIATTR_CUDA_API_VERSION
\tFormat:\tEIFMT_SVAL
\tValue:\t0x82 
"""


def test_parsers():
    assert gpu_report.parse_resource_usage(RESOURCE_USAGE) == {
        "_ZN7pyprune3fooIfEEvv": (64, 0, 1128, 0), "_kernel": (255, 104, 1024, 8)}
    # A kernel without a launch bound has no entry.
    assert gpu_report.parse_block_sizes(ELF) == {"_ZN7pyprune3fooIfEEvv": 256, "_kernel": 128}


def _write(tmp_path: Path, text: str) -> list[Path]:
    path = tmp_path / "k.cu"
    path.write_text(text)
    return [path]


def test_launch_bounds_check(tmp_path):
    ok = """
    constexpr int kThreads = 256;
    template <typename T, int kBlock>
    __global__ void __launch_bounds__(kBlock, 1024 / kBlock) a_kernel(T p) {}
    __global__ void __launch_bounds__(kThreads) b_kernel(int p) {}  // comment <<<x, 7>>>
    template <typename T, int kBlock> void launch(T p) {
      const auto kernel = a_kernel<T, kBlock>;
      kernel<<<blocks, kBlock, smem, stream>>>(p);
      config.blockDim = dim3(kBlock);
      cudaLaunchKernelEx(&config, kernel, p);
      launch_clusters(kernel, static_cast<unsigned>(n * k), kBlock, smem, stream, 8u, p);
      b_kernel
          <<<static_cast<unsigned>(n), kThreads, 0, stream>>>(1);
      b_kernel<<<static_cast<unsigned>((n + kWarps - 1) / kWarps), kThreads,
                 0, stream>>>(2);
    }
    """
    assert gpu_report.check_launch_bounds(_write(tmp_path, ok)) == []
    missing = "__global__ void c_kernel(int p) {}\nvoid f() { c_kernel<<<1, 256>>>(0); }\n"
    problems = gpu_report.check_launch_bounds(_write(tmp_path, missing))
    assert any("c_kernel has no __launch_bounds__" in p for p in problems)
    mismatch = ("constexpr int kThreads = 256;\n"
                "__global__ void __launch_bounds__(256) d_kernel(int p) {}\n"
                "void f() { d_kernel<<<1, kThreads, 0, s>>>(0); }\n")
    problems = gpu_report.check_launch_bounds(_write(tmp_path, mismatch))
    assert problems == ["k.cu: d_kernel is launched with kThreads threads but its "
                        "__launch_bounds__ is 256"]
    clusters = mismatch.replace("d_kernel<<<1, kThreads, 0, s>>>(0);",
                                "launch_clusters(d_kernel, 8u, kThreads, 0, s, 8u, 0);")
    assert gpu_report.check_launch_bounds(_write(tmp_path, clusters)) == problems
    # Through a lambda's parameter: checked against the kernels not launched by name.
    indirect = ("constexpr int kThreads = 256;\n"
                "template <bool kVec> __global__ void __launch_bounds__(kThreads) e_kernel() {}\n"
                "void f() { auto launch = [&](auto kernel) { kernel<<<1, {block}, 0, s>>>(); };\n"
                "  launch(e_kernel<true>); }\n")
    ok = indirect.replace("{block}", "kThreads")
    assert gpu_report.check_launch_bounds(_write(tmp_path, ok)) == []
    problems = gpu_report.check_launch_bounds(_write(tmp_path, indirect.replace("{block}", "128")))
    assert problems == ["k.cu: e_kernel is launched with 128 threads but its __launch_bounds__ "
                        "is kThreads"]


def test_dynamic_smem_kernels(tmp_path):
    text = """
    __global__ void __launch_bounds__(256) a_kernel(int p) {}
    __global__ void __launch_bounds__(256) b_kernel(int p) {}
    __global__ void __launch_bounds__(256) c_kernel(int p) {}
    void f(size_t smem) {
      a_kernel<<<dim3(1, 2), 256, 0, s>>>(0);
      b_kernel<<<dim3(1, 2), 256, smem, s>>>(0);
      auto launch = [&](auto kernel) { kernel<<<1, 256, smem>>>(0); };
      launch(c_kernel);
    }
    __global__ void __launch_bounds__(256) d_kernel(int p) {}
    __global__ void __launch_bounds__(256) e_kernel(int p) {}
    void g(size_t smem) {
      launch_clusters(d_kernel, 16u, 256, smem, s, 8u, 0);
      launch_clusters(e_kernel, static_cast<unsigned>(n), 256, 0, s, 8u, 0);
    }
    """
    assert gpu_report.dynamic_smem_kernels(_write(tmp_path, text)) == {"b_kernel", "c_kernel",
                                                                      "d_kernel"}


def test_launch_bounds_of_the_cuda_sources():
    """Every kernel in csrc/cuda declares __launch_bounds__ and is launched with it."""
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    assert sources
    assert gpu_report.check_launch_bounds(sources) == []


def _variant(regs, threads=256, stack=0, local=0, smem=0, kernel="k", dtype="fp32"):
    return Variant("cuda", kernel, dtype, "", threads, regs, stack, local, smem, 0)


def test_judge_fails_spills_local_memory_and_low_occupancy(monkeypatch):
    monkeypatch.setattr(gpu_report, "JUSTIFIED", {r"^cuda fine_kernel ": "latency-bound by design"})
    ok, spill, local, low, fine = (
        _variant(64), _variant(64, stack=16), _variant(64, local=4), _variant(200),
        _variant(200, kernel="fine_kernel"))
    gpu_report.judge([ok, spill, local, low, fine])
    assert ok.problems == [] and fine.problems == []
    assert fine.why_fine == "latency-bound by design"
    assert spill.problems == ["16 B stack frame (spills or local arrays)"]
    assert local.problems == ["4 B local memory"]
    assert low.problems == ["occupancy 12.5% < 25%"]


def test_a_cuda_kernel_without_launch_bounds_fails(monkeypatch):
    """cuda_variants marks an instantiation whose ELF has no thread count."""
    monkeypatch.setattr(gpu_report, "cuobjdump", lambda: "cuobjdump")
    outputs = {"--dump-resource-usage": RESOURCE_USAGE, "-elf": ELF.replace("EIATTR_REQNTID", "X")}
    monkeypatch.setattr(gpu_report, "_run", lambda args: outputs[args[1]])
    variants = {v.kernel: v for v in gpu_report.cuda_variants(Path("lib.so"))}
    assert variants["_kernel"].problems == [
        "no __launch_bounds__ (no EIATTR_MAX_THREADS in the ELF)"]
    assert variants["foo<float>"].threads == 256 and not variants["foo<float>"].problems


_NO_TRITON = (importlib.util.find_spec("triton") is None
              or os.environ.get("TRITON_INTERPRET", "0") == "1")


@pytest.mark.triton_aot
@pytest.mark.skipif(_NO_TRITON, reason="needs triton, without TRITON_INTERPRET")
def test_triton_variant_resources():
    """One Triton variant compiled for sm_90 and read back: registers, block size from .reqntid."""
    from pyprune.triton_kernels import aot

    found, _ = aot.variants()
    index = next(i for i, v in enumerate(found) if v.kernel.__name__ == "_kwta_backward_kernel")
    (_, (regs, stack, smem, local), threads, shared, num_warps, dense_steps, steps, loop, drains,
     draws, fences) = gpu_report._triton_one(index)
    assert 0 < regs <= 255 and stack == 0 and local == 0
    assert threads == 32 * num_warps == 32 * found[index].options["num_warps"]
    assert steps is None and dense_steps is None  # no tensor-core K loop in an elementwise kernel
    assert not drains and draws is None  # no loop, no Philox
    assert fences == 0


@pytest.mark.triton_aot
@pytest.mark.skipif(_NO_TRITON, reason="needs triton, without TRITON_INTERPRET")
def test_triton_kwta_split_atomics_are_relaxed():
    """The k-WTA split path's atomics (the filter's counters and bin counts) compile without a
    memory fence: an acq_rel atomic puts a MEMBAR.ALL.GPU before each, a wait for the program's
    stores in flight."""
    from pyprune.triton_kernels import aot

    found, _ = aot.variants()
    for name in ("_kwta_filter_kernel", "_kwta_finish_kernel"):
        index = next(i for i, v in enumerate(found) if v.kernel.__name__ == name)
        assert gpu_report._triton_one(index)[-1] == 0, name
    assert gpu_report.memory_fences([(0, "MEMBAR.ALL.GPU ;"), (16, "@P0 MEMBAR.SC.GPU ;"),
                                     (32, "ATOMG.E.ADD.STRONG.GPU PT, RZ, [R2.64], R3 ;"),
                                     (48, "MEMBAR.ALL.CTA ;"), (64, "FENCE.VIEW.ASYNC.S ;")]) == 2


@pytest.mark.triton_aot
@pytest.mark.skipif(_NO_TRITON, reason="needs triton, without TRITON_INTERPRET")
@pytest.mark.parametrize("in_list, in_scale", [(False, False), (True, False), (False, True)])
def test_triton_conv_pipeline_does_not_drain(in_list, in_scale):
    """The masked convolution's float32 (TF32) reduction keeps copies in flight across steps
    in every input-channel kind: listed channels and soft-mask scales loaded in the step would
    make the pipeline wait for every copy each trip."""
    from pyprune.triton_kernels import aot

    found, _ = aot.variants()
    index = next(i for i, v in enumerate(found)
                 if v.kernel.__name__ == "_masked_conv2d_forward_kernel"
                 and v.signature["x_ptr"] == "*fp32" and v.constexprs["PRECISION"] == "tf32"
                 and (v.constexprs["BLOCK_P"], v.constexprs["BLOCK_CO"]) == (64, 32)
                 and v.constexprs["IN_LIST"] == in_list and v.constexprs["IN_SCALE"] == in_scale
                 and not v.constexprs["SPARSE"] and not v.constexprs["PACKED"])
    *_, steps, _, drains, _, _ = gpu_report._triton_one(index)
    assert steps is not None and not drains


def _sm90_sass(variant) -> list:
    """The SASS body (gpu_report.sass_functions' (offset, instruction) rows) of one AOT variant
    compiled for gpu_report.ARCH."""
    from pyprune.triton_kernels import aot

    compiled = aot.compile_variant(variant, gpu_report.ARCH)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        (body,) = gpu_report.sass_functions(
            gpu_report._run([gpu_report.cuobjdump(), "-sass", path])).values()
    return body


@pytest.mark.triton_aot
@pytest.mark.skipif(_NO_TRITON, reason="needs triton, without TRITON_INTERPRET")
@pytest.mark.parametrize("aligned", [False, True])
def test_triton_sap_bernoulli_accesses(aligned):
    """SAP's bernoulli kernel (the 4096-element block that rows longer than 1024 take) as the
    JIT specializes a contiguous float32 launch (unit strides, 16-byte aligned pointers, L and
    the row strides multiples of 16): with ALIGNED (L % 4 == 0) it loads x and stores out in
    16-byte accesses, a thread's 16 elements of a block in 4 of each (the loop over an item's
    blocks is not unrolled); without it, 4-byte ones (a row may start inside a Philox group).
    Its Philox rounds multiply with IMAD.WIDE.U32 (_random._philox), not IMAD.HI.U32 beside
    IMAD."""
    from pyprune.triton_kernels import aot

    found, _ = aot.variants()
    v = next(v for v in found if v.kernel.__name__ == "_sap_bernoulli_kernel"
             and v.signature["x_ptr"] == "*fp32" and v.constexprs["BLOCK"] == 4096
             and not v.constexprs["WIDE"] and v.constexprs["ALIGNED"] == aligned)
    ones = {name: 1 for name in ("x_sl", "src_sl", "out_sl")}
    v = v._replace(signature={k: "constexpr" if k in ones else t for k, t in v.signature.items()},
                   constexprs={**v.constexprs, **ones},
                   aligned=("src_ptr", "x_ptr", "out_ptr", "part_ptr", "L", "x_sn", "src_sn",
                            "out_sn"))
    body = _sm90_sass(v)
    stores = [ins for _, ins in body if " STG." in f" {ins}"]
    wide = [ins for _, ins in body if "IMAD.WIDE.U32" in ins]
    # 4 Philox evaluations a thread, 2 products a round (the first round's products of the
    # stream words, the same in every lane, may go to the uniform datapath)
    assert len(wide) >= 4 * 9 * 2
    # Besides a block's stores, a partials item's two 4-byte ones (its chunk's sum and max |x|),
    # then its release: a fence, then the done count's atomic add.
    if aligned:
        assert len(stores) == 4 + 2 and sum("STG.E.128" in ins for ins in stores) == 4
        assert sum("LDG.E.128" in ins for _, ins in body) >= 4
    else:
        assert len(stores) == 16 + 2 and not any(".128" in ins for ins in stores)
    # src / q: the hardware reciprocal of each element on the fast path, a full division
    # (one MUFU.RCP each too) in a block with a zero uniform; the zero-uniform test reduces the
    # Philox words within warps by REDUX (no shared-memory layout change of the uniforms).
    assert sum("MUFU.RCP" in ins for _, ins in body) >= 2 * 16
    assert any("REDUX.MIN" in ins for _, ins in body)
    # (The ticket is relaxed and the wait an acquire load: the release's is the one fence.)
    ops = [ins for _, ins in body]
    assert gpu_report.memory_fences(body) == gpu_report.RELEASES["sap._sap_bernoulli_kernel"] == 1
    fence = next(i for i, ins in enumerate(ops) if "MEMBAR" in ins)
    assert any("G.E.ADD" in ins and ".GPU" in ins for ins in ops[fence:])


@pytest.mark.triton_aot
@pytest.mark.skipif(_NO_TRITON, reason="needs triton, without TRITON_INTERPRET")
@pytest.mark.parametrize("dtype", ["*fp32", "*bf16"])
def test_triton_conv_packed_loop_copies(dtype):
    """The packed convolution's K loop (x and the weight laid out by _pack_kernel) copies the
    x tile in 8-byte asynchronous copies that fill L1 (LDGSTS.E.64: cp.async.ca; a chunk's
    next taps reread the same patch of xp from there) and the weight tile in 16-byte ones
    that bypass it, 16-bit elements included, keeps them in flight across steps, and issues
    under 100 lane instructions a thread a step (sm_90 SASS): the alignment its strides and
    pointers promise reaches the compiler, and the 8-byte hint on x's channels holds."""
    from pyprune.triton_kernels import aot

    found, _ = aot.variants()
    index = next(i for i, v in enumerate(found)
                 if v.kernel.__name__ == "_masked_conv2d_forward_kernel"
                 and v.signature["x_ptr"] == dtype and v.constexprs["PACKED"]
                 and v.constexprs["PRECISION"] == ("tf32" if dtype == "*fp32" else "ieee")
                 and (v.constexprs["BLOCK_P"], v.constexprs["BLOCK_CO"]) == (64, 32))
    body = _sm90_sass(found[index])
    steps = gpu_report.step_instructions(body)
    assert steps is not None and steps < 100 and not gpu_report.pipeline_drains(body)
    (first, last), _ = gpu_report._step_loop(body)
    kinds = [ins.split()[0] for _, ins in body[first:last + 1] if "LDGSTS" in ins]
    esize = 4 if dtype == "*fp32" else 2
    threads = 32 * found[index].options["num_warps"]
    assert set(kinds) == {"LDGSTS.E.64", "LDGSTS.E.BYPASS.128"}
    assert kinds.count("LDGSTS.E.64") == 64 * 32 * esize // (8 * threads)  # a step's x tile


def test_cuda_spills_on_sm_80_are_problems(monkeypatch):
    """cuda_spills reads the library's sm_80 instantiations and names each one with a stack
    frame or local memory; main adds them to its problems for every SPILL_ARCHS entry."""
    monkeypatch.setattr(gpu_report, "cuobjdump", lambda: "cuobjdump")
    calls = []

    def run(args):
        calls.append(args)
        return RESOURCE_USAGE.replace("sm_90", "sm_80")

    monkeypatch.setattr(gpu_report, "_run", run)
    problems = gpu_report.cuda_spills(Path("lib.so"), 80)
    assert calls == [["cuobjdump", "--dump-resource-usage", "-arch", "sm_80", "lib.so"]]
    assert problems == ["sm_80: cuda _kernel -: 104 B stack frame, 8 B local memory (255 registers)"]
    monkeypatch.setattr(gpu_report, "_run", lambda args: "")
    assert gpu_report.cuda_spills(Path("lib.so"), 80) == [
        "lib.so: no sm_80 kernels (is it the make check-cuda build?)"]
    assert 80 in gpu_report.SPILL_ARCHS


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_aot_compile_fails_on_a_spill(monkeypatch):
    """The AOT compile step reports a variant whose cubin has a stack frame or local memory as
    failed, on the architecture where it spills."""
    from pyprune.triton_kernels import aot

    def fake(kernel):
        return aot.Variant("m", kernel, {}, {"BLOCK": 64}, {"num_warps": 4}, (80, 90))

    variant = fake(type("K", (), {"__name__": "_k_kernel"}))
    monkeypatch.setattr(aot, "variants", lambda: ([variant], []))
    monkeypatch.setattr(aot, "compile_variant",
                        lambda v, arch: type("C", (), {"asm": {"cubin": bytes([arch])}})())
    monkeypatch.setattr(aot, "cubin_resources",
                        lambda cubin: (128, 8, 0) if cubin == bytes([80]) else (100, 0, 0))
    index, arch, ones, error, _ = aot._compile_one((0, 80, False))
    assert (index, arch, ones) == (0, 80, False) and "spills on sm_80: 8 B stack frame" in error
    assert aot._compile_one((0, 90, False))[3] is None


# A kernel's SASS (cuobjdump -sass): a prologue, then a K loop (0x0040 .. 0x00c0) holding a
# global load and an inner mma loop (0x0060 .. 0x0090) of two trips, then a loop without mma.
SASS = """
        Function : _Z3gemmv
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;
        /*0030*/                   MOV R2, RZ ;
        /*0040*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0050*/                   STS [R0], R4 ;
        /*0060*/                   LDS R5, [R0] ;
        /*0070*/                   HMMA.1684.F32.TF32 R8, R4, R5, R8 ;
        /*0080*/                   IADD3 R6, R6, 0x1, RZ ;
        /*0090*/              @!P0 BRA 0x60 ;
        /*00a0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*00b0*/                   IADD3 R7, R7, 0x1, RZ ;
        /*00c0*/              @!P1 BRA 0x40 ;
        /*00d0*/                   IADD3 R9, R9, 0x1, RZ ;
        /*00e0*/              @!P2 BRA 0xd0 ;
        /*00f0*/                   EXIT ;
"""


def test_step_instructions():
    """A step: the innermost loop with a global load and an mma (0x40 .. 0xc0, 9 instructions),
    plus the inner mma loop (0x60 .. 0x90, 4) once per extra trip; none without such a loop."""
    (body,) = gpu_report.sass_functions(SASS).values()
    assert len(body) == 16
    assert gpu_report.step_instructions(body) == 9
    assert gpu_report.step_instructions(body, trips=2) == 13
    no_mma = [(a, i.replace("HMMA.1684.F32.TF32", "FFMA")) for a, i in body]
    assert gpu_report.step_instructions(no_mma) is None


# A K loop (0x0010 .. 0x00e0) with a branch (BSSY at 0x0030, reconverging at 0x0090) around a
# loop of asynchronous copies (0x0050 .. 0x0080): the packed convolution's patch copies.
BRANCH_SASS = """
        Function : _Z5patchv
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0020*/                   ISETP.NE.AND P0, PT, R2, RZ, PT ;
        /*0030*/                   BSSY B0, 0x90 ;
        /*0040*/              @P0 BRA 0x80 ;
        /*0050*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*0060*/                   IADD3 R3, R3, 0x1200, RZ ;
        /*0070*/              @!P1 BRA 0x50 ;
        /*0080*/                   NOP ;
        /*0090*/                   BSYNC B0 ;
        /*00a0*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR4][R6.64] ;
        /*00b0*/                   LDSM.16.M88.4 R8, [R7] ;
        /*00c0*/                   HMMA.1688.F32.TF32 R12, R8, R10, R12 ;
        /*00d0*/                   IADD3 R2, R2, 0x1, RZ ;
        /*00e0*/              @!P2 BRA 0x10 ;
        /*00f0*/                   EXIT ;
"""


def test_branch_copy_loops():
    """The copy loop under a branch inside the K-loop step: its branch from BSSY to the
    reconvergence point (0x30 .. 0x90, 7 instructions) and the loop (0x50 .. 0x70, 3); none in
    a step without one; None without a step."""
    (body,) = gpu_report.sass_functions(BRANCH_SASS).values()
    assert gpu_report.step_instructions(body) == 14
    assert gpu_report.branch_copy_loops(body) == [(7, 3)]
    (plain,) = gpu_report.sass_functions(SASS).values()
    assert gpu_report.branch_copy_loops(plain) == []
    no_mma = [(a, i.replace("HMMA.1688.F32.TF32", "FFMA")) for a, i in body]
    assert gpu_report.branch_copy_loops(no_mma) is None


def test_pipeline_drains():
    """A loop of asynchronous copies that waits for all of them each trip drains; one that
    leaves copies in flight (DEPBAR.LE SB0, 0x1) does not, nor does a full wait in an outer
    loop around such a loop (a chunk's drain), nor one in a loop without copies."""
    def body(*lines):
        return [(16 * i, ins) for i, ins in enumerate(lines)]

    copy = "LDGSTS.E [R1], desc[UR4][R2.64]"
    drained = body("NOP", copy, "LDGDEPBAR", "DEPBAR.LE SB0, 0x0", "HGMMA", "@P0 BRA 0x10",
                   "EXIT")
    assert gpu_report.pipeline_drains(drained)
    in_flight = [(a, i.replace("0x0", "0x1")) for a, i in drained]
    assert not gpu_report.pipeline_drains(in_flight)
    outer = body("NOP", "NOP", copy, "DEPBAR.LE SB0, 0x1", "HGMMA", "@P0 BRA 0x20",
                 "DEPBAR.LE SB0, 0x0", "@P1 BRA 0x10", "EXIT")
    assert not gpu_report.pipeline_drains(outer)
    no_copy = [(a, i.replace("LDGSTS.E [R1],", "LDG.E R1,")) for a, i in drained]
    assert not gpu_report.pipeline_drains(no_copy)


def test_loop_instructions():
    """The shortest loop (0xd0 .. 0xe0, 2 instructions) and the 14 others; None without a
    backward branch."""
    (body,) = gpu_report.sass_functions(SASS).values()
    assert gpu_report.loop_instructions(body) == (2, 14)
    straight = [(a, i) for a, i in body if "BRA" not in i]
    assert gpu_report.loop_instructions(straight) is None


def test_kwta_pass_counts_that_drift_from_the_roofline_fail(monkeypatch):
    """check_step_ops also holds the roofline's k-WTA select pass (loop, rest) counts against
    the fp32 stride-1 variants' SASS."""
    from types import SimpleNamespace

    from benchmarks import roofline

    monkeypatch.setattr(roofline, "CUDA_TC_STEP_OPS", {})
    monkeypatch.setattr(roofline, "CUDA_TC_PACKED_STEP_OPS", {})
    monkeypatch.setattr(roofline, "TRITON_CONV_STEP_OPS", {})
    monkeypatch.setattr(roofline, "TRITON_CONV_PACKED_STEP_OPS", {})
    monkeypatch.setattr(roofline, "TRITON_CONV_SPARSE_PACKED_STEP_OPS", {})
    monkeypatch.setattr(roofline, "TRITON_SAP_MERGE_OPS", {})
    monkeypatch.setattr(roofline, "TRITON_SAP_PARTIALS_OPS", {})
    found = [SimpleNamespace(kernel=SimpleNamespace(__name__="_kwta_forward_kernel"),
                             constexprs={"BLOCK": 1024, "UNIT": unit, "EVEN": False})
             for unit in (True, False)]
    rows = [Variant("triton", "kwta._kwta_forward_kernel", "fp32", "", 32, 168, 0, 0, 0, 0,
                    loop_ops=ops) for ops in ((124, 1188), (60, 508))]
    monkeypatch.setattr(roofline, "TRITON_KWTA_COUNT_PASS", {(1024, False): (125, 1200, 168)})
    assert gpu_report.check_step_ops("", rows, found) == []
    monkeypatch.setattr(roofline, "TRITON_KWTA_COUNT_PASS", {(1024, False): (60, 1200, 96),
                                                             (1024, True): (124, 724, 92)})
    problems = gpu_report.check_step_ops("", rows, found)
    assert len(problems) == 3, problems
    assert "BLOCK=1024 UNIT (select pass): the roofline charges 60" in problems[0]
    assert "BLOCK=1024 UNIT: the roofline assumes 96 registers" in problems[1]
    assert "BLOCK=1024 UNIT EVEN: no such variant" in problems[2]


def test_draw_loop_instructions():
    """The longest innermost loop: 3 instructions here (0x20 .. 0x40; the loop around it is not
    innermost, the one at 0x60 is shorter); None without a loop."""
    philox = "IMAD.HI.U32 R5, R4, -0x2daee0ad, RZ"
    body = [(0x00, "NOP"), (0x10, "NOP"), (0x20, philox), (0x30, "LDG.E R1, desc[UR4][R2.64]"),
            (0x40, "@P0 BRA 0x20"), (0x50, "@P1 BRA 0x10"), (0x60, "IMAD R1, R2, R3, RZ"),
            (0x70, "@P2 BRA 0x60"), (0x80, "EXIT")]
    assert gpu_report.draw_loop_instructions(body) == 3
    assert gpu_report.draw_loop_instructions([(a, i) for a, i in body if "BRA" not in i]) is None


def test_sap_draw_counts_that_drift_from_the_roofline_fail(monkeypatch):
    """check_step_ops holds the roofline's SAP draw-tile counts (the merge's tile a thread, its
    registers; the partials' draw loop) against the fp32 variants' SASS."""
    from types import SimpleNamespace

    from benchmarks import roofline

    for table in ("CUDA_TC_STEP_OPS", "CUDA_TC_PACKED_STEP_OPS", "TRITON_CONV_STEP_OPS",
                  "TRITON_CONV_PACKED_STEP_OPS", "TRITON_CONV_SPARSE_PACKED_STEP_OPS",
                  "TRITON_KWTA_COUNT_PASS"):
        monkeypatch.setattr(roofline, table, {})
    def variant(name, stored):
        flag = "STORED" if name == "_sap_merge_kernel" else "STORE"
        return SimpleNamespace(kernel=SimpleNamespace(__name__=name),
                               constexprs={"E": 1024, flag: stored}, options={"num_warps": 2})

    found = [variant("_sap_merge_kernel", False), variant("_sap_merge_kernel", True),
             variant("_sap_partials_kernel", False)]
    rows = [Variant("triton", "sap._sap_merge_kernel", "fp32", "", 64, 136, 0, 0, 0, 0,
                    draw_ops=514),
            Variant("triton", "sap._sap_merge_kernel", "fp32", "", 64, 136, 0, 0, 0, 0,
                    draw_ops=279),
            Variant("triton", "sap._sap_partials_kernel", "fp32", "", 64, 55, 0, 0, 0, 0,
                    draw_ops=242)]
    counts = {"item": 1500, "search_step": 91, "tile": 520, "regs": 136, "stored_tile": 280,
              "stored_regs": 136}
    monkeypatch.setattr(roofline, "TRITON_SAP_MERGE_OPS", {1024: counts})
    monkeypatch.setattr(roofline, "TRITON_SAP_PARTIALS_OPS", {"tile": 240})
    assert gpu_report.check_step_ops("", rows, found) == []
    monkeypatch.setattr(roofline, "TRITON_SAP_MERGE_OPS",
                        {1024: {**counts, "tile": 405, "regs": 96, "stored_tile": 514},
                         256: {**counts, "tile": 462, "regs": 115}})
    monkeypatch.setattr(roofline, "TRITON_SAP_PARTIALS_OPS", {"tile": 488})
    problems = gpu_report.check_step_ops("", rows, found)
    assert len(problems) == 6, problems
    assert "E=1024 (a draw tile): the roofline charges 405" in problems[0]
    assert "E=1024: the roofline assumes 96 registers" in problems[1]
    assert "E=1024 STORED (a draw tile): the roofline charges 514" in problems[2]
    assert "E=256: no such variant" in problems[3]
    assert "E=256 STORED: no such variant" in problems[4]
    assert "_sap_partials_kernel float32 E=1024 (a draw tile): the roofline charges 488" in problems[5]


def test_step_ops_that_drift_from_the_roofline_fail(monkeypatch):
    """check_step_ops: the roofline's count of a CUDA or Triton K step within
    STEP_OPS_TOLERANCE of the SASS passes; past it, or for a variant not compiled, it fails."""
    from types import SimpleNamespace

    from benchmarks import roofline

    monkeypatch.setattr(gpu_report, "demangle",
                        lambda names: {n: "void masked_conv2d_tc_kernel<float>(Params<float>)"
                                       for n in names})
    monkeypatch.setattr(roofline, "CUDA_TC_STEP_OPS", {"float32": 13})
    monkeypatch.setattr(roofline, "CUDA_TC_PACKED_STEP_OPS", {})
    monkeypatch.setattr(roofline, "TRITON_KWTA_COUNT_PASS", {})
    monkeypatch.setattr(roofline, "TRITON_SAP_MERGE_OPS", {})
    monkeypatch.setattr(roofline, "TRITON_SAP_PARTIALS_OPS", {})
    constexprs = {"BLOCK_P": 64, "BLOCK_CO": 32, "SPARSE": False, "PRECISION": "tf32",
                  "IN_LIST": False, "IN_SCALE": False, "PACKED": False}
    found = [SimpleNamespace(kernel=SimpleNamespace(__name__="_masked_conv2d_forward_kernel"),
                             constexprs=constexprs),
             SimpleNamespace(kernel=SimpleNamespace(__name__="_masked_conv2d_forward_kernel"),
                             constexprs={**constexprs, "PACKED": True}),
             SimpleNamespace(kernel=SimpleNamespace(__name__="_masked_conv2d_forward_kernel"),
                             constexprs={**constexprs, "BLOCK_P": 128, "BLOCK_CO": 16,
                                         "SPARSE": True, "PACKED": True})]
    rows = [Variant("triton", "masked_conv._masked_conv2d_forward_kernel", "fp32", "", 256, 100,
                    0, 0, 0, 0, step_ops=ops) for ops in (489, 80, 144)]
    monkeypatch.setattr(roofline, "TRITON_CONV_STEP_OPS", {(False, False, 64, 32): {"float32": 500}})
    monkeypatch.setattr(roofline, "TRITON_CONV_PACKED_STEP_OPS", {(64, 32): {"float32": 82}})
    monkeypatch.setattr(roofline, "TRITON_CONV_SPARSE_PACKED_STEP_OPS",
                        {(128, 16): {"float32": 146}})
    assert gpu_report.check_step_ops(SASS, rows, found) == []
    monkeypatch.setattr(roofline, "TRITON_CONV_STEP_OPS",
                        {(False, False, 64, 32): {"float32": 600},
                         (False, False, 64, 64): {"float32": 370}})
    monkeypatch.setattr(roofline, "TRITON_CONV_PACKED_STEP_OPS", {(64, 32): {"float32": 160}})
    monkeypatch.setattr(roofline, "TRITON_CONV_SPARSE_PACKED_STEP_OPS",
                        {(128, 16): {"float32": 200}})
    monkeypatch.setattr(roofline, "CUDA_TC_STEP_OPS", {"float32": 20})
    monkeypatch.setattr(roofline, "CUDA_TC_PACKED_STEP_OPS", {})
    problems = gpu_report.check_step_ops(SASS, rows, found)
    assert len(problems) == 5, problems
    assert "masked_conv2d_tc_kernel<float>: the roofline charges 20" in problems[0]
    assert "BLOCK_CO=32: the roofline charges 600" in problems[1]
    assert "BLOCK_CO=64: no such variant" in problems[2]
    assert "BLOCK_CO=32 PACKED: the roofline charges 160" in problems[3]
    assert "BLOCK_CO=16 SPARSE PACKED: the roofline charges 200" in problems[4]
