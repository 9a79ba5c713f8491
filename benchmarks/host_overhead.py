"""``python -m benchmarks.host_overhead [--rounds R] [--block-ms MS]``
``python -m benchmarks.host_overhead --launches [--device cuda] [--out CSV]``

The host (Python) time of one pyprune call per op, in the shape of the roofline's
``host_us`` entries ``pyprune_forward``, ``pyprune_grad`` and ``pyprune_backward``
(benchmarks/roofline.py), measured on this machine.

Method
------
* Inputs: tiny CPU float32 tensors (x of shape 2x4x4x4, the other arguments to match; CAS
  with 10 classes, a bias and labels; masked_conv2d 3x3, padding 1, a bias and a bool out_mask
  shared by the batch, the static channel path), the cpu backend, one thread (``torch.set_num_threads(1)``), Python's GC off while timing. Each call
  runs inside ``pyprune.use_backend("cpu")``, as the benchmark harness calls a pyprune provider
  (benchmarks/harness.py ``provider_fn``), so the block's cost is part of the figures.
* Timed quantities, per call: a block of calls (sized to take about ``--block-ms``) between
  two reads of the thread's CPU time (``time.thread_time_ns``), which other processes on a
  shared machine inflate far less than wall time (through caches only, not by taking the
  core); single-threaded, the kernels and the autograd engine (which runs CPU graphs on the
  calling thread) count in it too:
    F   the op with grad mode off, no input requiring grad (the harness's forward mode; grad
        mode is switched off around the block, as what it costs is no part of the op's);
    G   the op with the differentiated inputs requiring grad (it records the autograd graph);
    B   ``torch.autograd.grad(outputs, inputs, grads, retain_graph=True)`` on one graph of the
        op built before timing (the harness's backward mode);
    E   the same autograd.grad call on views ``leaf.view_as(leaf)`` of leaves shaped like the
        op's differentiable outputs: the engine's own cost, its checks of each output and
        gradient included, for a graph whose backward launches nothing;
    KF, KB  the kernels: every ``torch.ops.pyprune`` op and seed draw (``aten.randint``) that
        one forward (KF) or one backward (KB) reaches, recorded once by a TorchDispatchMode with
        their exact arguments, then called directly with autograd skipped
        (``torch._C._AutoDispatchBelowAutograd``). This is the dispatcher call and the C++
        kernel, which the roofline charges as launches ("inner", "aten") of their own.
* Reported (us): pyprune_forward = F - KF, pyprune_grad = G - F, pyprune_backward = B - E - KB.
  Everything else a call does counts as pyprune's: argument checks, backend choice, views,
  autograd wrappers and the aten calls the engine makes for it (zero gradients materialised
  for non-differentiable outputs).
* The triton backend's Python (run with ``TRITON_INTERPRET=1`` in the environment, so that
  its launchers run on CPU tensors): its launchers do far more in Python than the cpu
  backend's one C++ call (block sizes, packing and mask layouts, allocations, the launch's
  arguments). With every Triton launch made a no-op (the interpreter's kernel[grid] returns a
  stub; ``torch._assert_async`` too), TF is the forward as F and TB the backward as B, and
  TKF, TKB the aten ops that one such forward or backward runs which launch work on a GPU
  (every aten op but views, allocations and metadata: the roofline lists them as launches of
  their own, and on these CPU tensors they would count their CPU kernels) spend: their self
  CPU time per call in torch.profiler's events (a TorchDispatchMode does not see inside the
  custom ops that wrap the launchers), over 50 calls, once. pyprune_forward_triton =
  TF - TKF and pyprune_backward_triton = TB - E - TKB: the launchers' Python and their views and allocations, without the Triton
  launches, which the roofline charges as ``triton`` each.
* Rounds: every quantity of every op is timed once per round, in turn (interleaved, so a
  shared machine's changing speed affects them alike); a figure is the median over rounds of
  its per-round difference.
* Limits: a kernel timed alone runs with warm caches and may cost more inside the call; that
  excess lands in the pyprune figures. On a busy 2-core machine one run's figures still move
  by up to ~1.5x; compare runs made back to back.

The roofline's ``host_us`` pyprune_* entries are the median of three runs of this script,
rounded to 5 us; they assume the GPU machine's host runs Python as fast as the machine that
measured them.

Launch costs (``--launches``)
-----------------------------
The H200 run measured most small cases far above the roofline's predictions while the GPU was
busy for a fraction of the time (eager's rows alone 3-10x over, so the host, not pyprune, is
most of the gap): the host figures above, taken on the dev VM's CPU, do not hold on the GPU
machine. ``--launches`` measures, on the machine and device it runs on, the host time (thread
CPU time, per call) of what the roofline's per-launch ``host_us`` entries stand for and of
whole calls, so that the model can take the GPU machine's own figures:
    aten          an aten op called from Python on a one-element tensor (its launch included);
    harness       the benchmark harness's per-call work around the call (the L2-flush zero_ of
                  a 256 MiB buffer, two events recorded; harness_before + harness_after);
    triton        a Triton launcher called directly (triton_kernels.noise.gaussian_noise on a
                  one-element tensor: its checks, the JIT's dispatch and the launch);
    counters      the kept counters of a Triton launch that counts with atomics
                  (triton_kernels/_counters: the stream and capture queries, no launch);
    <op>:<backend> one forward call of the public op on SHAPE inputs (as for the figures
                  above) with the backend forced, grad mode off, launches included; and
    <op>:eager     the benchmark's eager version of the same call (kwta, noise only).
On a GPU, blocks are short (200 calls) and the device is synchronised between them, outside
the timed region, so that a full launch queue never blocks the host inside one. make gpu runs
it after the benchmarks (host_costs.csv in the results folder).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyprune

OPS = ("kwta", "sap", "noise", "cas", "masked_conv")
FIGURES = ("pyprune_forward", "pyprune_grad", "pyprune_backward")
TRITON_FIGURES = ("pyprune_forward_triton", "pyprune_backward_triton")
SHAPE = (2, 4, 4, 4)
_NO_GRAD = ("F", "KF", "TF")  # the quantities timed with grad mode off


@dataclass
class Spec:
    """One op's call: ``fn(*inputs)``, differentiated w.r.t. ``inputs[i]`` for i in ``wrt``."""

    fn: Callable[..., Any]
    inputs: tuple
    wrt: tuple[int, ...]


def _specs(device: torch.device = torch.device("cpu")) -> dict[str, Spec]:
    gen = torch.Generator().manual_seed(0)
    n, c = SHAPE[:2]
    x, weight, bias, label, conv_weight, conv_bias, out_mask = (t.to(device) for t in (
        torch.randn(SHAPE, generator=gen),
        torch.randn(10, c, generator=gen),
        torch.randn(10, generator=gen),
        torch.randint(10, (n,), generator=gen),
        torch.randn(c, c, 3, 3, generator=gen),
        torch.randn(c, generator=gen),
        torch.tensor([True, False] * (c // 2))))
    return {
        "kwta": Spec(lambda x: pyprune.kwta(x, 0.25), (x,), (0,)),
        "sap": Spec(lambda x: pyprune.sap(x, 1.0), (x.abs(),), (0,)),
        "noise": Spec(lambda x: pyprune.gaussian_noise(x, 0.1, multiplicative=True), (x,), (0,)),
        "cas": Spec(pyprune.cas, (x, weight, bias, label), (0, 1, 2)),
        "masked_conv": Spec(
            lambda x, w, b: pyprune.masked_conv2d(x, w, b, 1, 1, out_mask=out_mask),
            (x, conv_weight, conv_bias), (0, 1, 2)),
    }


def _forced(fn: Callable[..., Any], backend: str = "cpu") -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        with pyprune.use_backend(backend):
            return fn(*args)

    return call


def _interpreting() -> bool:
    """Whether Triton runs in its interpreter here (TRITON_INTERPRET=1 before its import)."""
    return os.environ.get("TRITON_INTERPRET") == "1" and "triton" in pyprune.backends("cpu")


@contextlib.contextmanager
def _launches_stubbed():
    """Every Triton launch (the interpreter's kernel[grid](...)) and torch._assert_async a
    no-op inside: what stays of a triton-backend call is its Python and its aten calls."""
    from triton.runtime.interpreter import InterpretedFunction

    def stub(*args: Any, **kwargs: Any) -> None:
        return None

    getitem, assert_async = InterpretedFunction.__getitem__, torch._assert_async
    InterpretedFunction.__getitem__ = lambda self, grid: stub
    torch._assert_async = stub
    try:
        yield
    finally:
        InterpretedFunction.__getitem__, torch._assert_async = getitem, assert_async


class _Recorder(TorchDispatchMode):
    """Records the kernels a call reaches: pyprune ops and seed draws, with their arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "pyprune" or func.__name__.startswith("randint"):
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


# Aten ops that launch nothing on a GPU: allocations and metadata (views are found by their
# schema).
_FREE_ATEN = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
              "lift_fresh", "detach", "alias", "_unsafe_view", "as_strided", "resize_",
              "is_nonzero", "_local_scalar_dense", "item", "result_type", "size", "stride",
              "dim", "numel", "is_same_size", "_has_compatible_shallow_copy_type"}


def _launching(name: str) -> bool:
    """Whether the aten op of a profiler event's name (``aten::sum``) launches work on a GPU:
    not an allocation, metadata or a view."""
    if not name.startswith("aten::"):
        return False
    op = name.removeprefix("aten::")
    if op in _FREE_ATEN:
        return False
    packet = getattr(torch.ops.aten, op, None)
    if packet is None:
        return True
    return not any(getattr(packet, o).is_view for o in packet.overloads())


def _aten_us(fn: Callable[[], Any], grad: bool, calls: int = 50) -> float:
    """The self CPU time a call spends in launching aten ops (see _launching), from the
    profiler: it sees inside the custom ops that wrap the Triton launchers, where a
    TorchDispatchMode does not."""
    from torch.profiler import ProfilerActivity, profile

    with torch.set_grad_enabled(grad), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if _launching(e.key)) / calls


def _replay(calls: list[tuple]) -> Callable[[], None]:
    def run() -> None:
        with torch._C._AutoDispatchBelowAutograd():
            for func, args, kwargs in calls:
                func(*args, **kwargs)

    return run


def _outputs(out: Any) -> list[torch.Tensor]:
    return [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]


def _quantities(spec: Spec, backend: str = "cpu"
                ) -> tuple[dict[str, Callable[[], Any]], dict[str, list]]:
    """The timed callables of one op (F, G, B, E, KF, KB) and the kernels recorded."""
    fn = _forced(spec.fn, backend)
    plain = spec.inputs
    args = [t if t is None or i not in spec.wrt else t.detach().requires_grad_()
            for i, t in enumerate(spec.inputs)]
    targets = [args[i] for i in spec.wrt]

    def forward() -> Any:
        return fn(*plain)

    graph = _outputs(fn(*args))
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(o.shape, dtype=o.dtype, generator=gen) for o in graph]

    def backward() -> Any:
        return torch.autograd.grad(graph, targets, grads, retain_graph=True)

    leaves = [torch.randn(o.shape, dtype=o.dtype, requires_grad=True) for o in graph]
    views = [leaf.view_as(leaf) for leaf in leaves]

    def engine() -> Any:
        return torch.autograd.grad(views, leaves, grads, retain_graph=True)

    with _Recorder() as fwd_calls, torch.no_grad():
        forward()
    with _Recorder() as bwd_calls:
        backward()
    recorded = {"KF": fwd_calls.calls, "KB": bwd_calls.calls}
    timed = {
        "F": forward,
        "G": lambda: fn(*args),
        "B": backward,
        "E": engine,
        "KF": _replay(fwd_calls.calls),
        "KB": _replay(bwd_calls.calls),
    }
    return timed, recorded


def _block(fn: Callable[[], Any], calls: int, grad: bool = True) -> float:
    with torch.set_grad_enabled(grad):
        start = time.thread_time_ns()
        for _ in range(calls):
            fn()
        return (time.thread_time_ns() - start) / calls * 1e-3


@contextlib.contextmanager
def _single_thread():
    """torch on one thread inside (host figures of one core), the setting restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _rounds(blocks: dict[Any, Callable[[], float]], rounds: int,
            after: Callable[[], None] = lambda: None) -> dict[Any, list[float]]:
    """{key: its block's figure in each of ``rounds`` interleaved rounds}: every block in turn
    (``after`` each, outside its timing), Python's GC off while timing and run between rounds."""
    samples: dict[Any, list[float]] = {key: [] for key in blocks}
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for key, block in blocks.items():
                samples[key].append(block())
                after()
            gc.collect()
    finally:
        if enabled:
            gc.enable()
    return samples


def measure(ops: tuple[str, ...] = OPS, rounds: int = 21, block_ms: float = 20.0,
            verbose: bool = False) -> dict[str, dict[str, float]]:
    """{figure: {op: us}} for the FIGURES (and the TRITON_FIGURES where Triton interprets),
    medians over ``rounds`` interleaved rounds."""
    triton = _interpreting()
    with _single_thread(), (_launches_stubbed() if triton else contextlib.nullcontext()):
        specs = _specs()
        timed = {}
        aten: dict[str, tuple[float, float]] = {}  # triton: TKF, TKB
        for op in ops:
            timed[op], recorded = _quantities(specs[op])
            if triton:  # the triton backend's forward and backward, launches stubbed
                stubbed, _ = _quantities(specs[op], "triton")
                timed[op].update(TF=stubbed["F"], TB=stubbed["B"])
                aten[op] = (_aten_us(stubbed["F"], grad=False), _aten_us(stubbed["B"], grad=True))
            if verbose:
                for key, calls in recorded.items():
                    print(f"{op} {key}: " + ", ".join(str(c[0]) for c in calls))
        blocks = {}
        for op in ops:  # warm up; size each block to about block_ms
            for key, fn in timed[op].items():
                grad = key not in _NO_GRAD
                _block(fn, 20, grad)
                size = max(10, int(block_ms * 1e3 / _block(fn, 20, grad)))
                blocks[op, key] = lambda fn=fn, size=size, grad=grad: _block(fn, size, grad)
        samples = _rounds(blocks, rounds)
    result: dict[str, dict[str, float]] = {f: {} for f in FIGURES + (TRITON_FIGURES if triton
                                                                     else ())}
    for op in ops:
        s = {key: samples[op, key] for key in timed[op]}
        per_round = list(zip(*(s[k] for k in ("F", "G", "B", "E", "KF", "KB"))))
        result["pyprune_forward"][op] = statistics.median(f - kf for f, _, _, _, kf, _ in per_round)
        result["pyprune_grad"][op] = statistics.median(g - f for f, g, *_ in per_round)
        result["pyprune_backward"][op] = statistics.median(
            b - e - kb for _, _, b, e, _, kb in per_round)
        if triton:
            tkf, tkb = aten[op]
            result["pyprune_forward_triton"][op] = statistics.median(s["TF"]) - tkf
            result["pyprune_backward_triton"][op] = statistics.median(
                tb - e for tb, e in zip(s["TB"], s["E"])) - tkb
            if verbose:
                print(f"{op}: TKF {tkf:.1f}, TKB {tkb:.1f}")
        if verbose:
            print(f"{op}: " + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in s.items()))
    return result


def _launch_specs(device: torch.device) -> dict[str, Callable[[], Any]]:
    """The callables of --launches on device (see the module docstring)."""
    specs = _specs(device)
    one = torch.ones(1, device=device)
    calls: dict[str, Callable[[], Any]] = {"aten": lambda: one.add_(1.0)}
    if device.type == "cuda":
        from . import harness

        flush = torch.empty(harness.L2_FLUSH_BYTES // 4, dtype=torch.float32, device=device)
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))

        def around() -> None:
            flush.zero_()
            start.record()
            end.record()

        calls["harness"] = around
    backends = [b for b in pyprune.backends(device.type) if b != "reference"]
    if "triton" in backends:
        from pyprune.triton_kernels import _counters
        from pyprune.triton_kernels import noise as triton_noise

        seed = torch.tensor([1, 2], dtype=torch.int64)
        calls["triton"] = lambda: triton_noise.gaussian_noise(one, seed, 0.1, False)

        def counted() -> None:
            with _counters.counters(device, 64):
                pass

        calls["counters"] = counted
    for name, spec in specs.items():
        for backend in backends:
            def call(spec=spec, backend=backend) -> Any:
                with pyprune.use_backend(backend):
                    return spec.fn(*spec.inputs)

            calls[f"{name}:{backend}"] = call
    from . import kwta as kwta_bench
    from . import noise as noise_bench

    x = specs["kwta"].inputs[0]
    k = int(0.25 * x[0].numel())
    calls["kwta:eager"] = lambda: kwta_bench.kwta_sample(x, k)
    calls["noise:eager"] = lambda: noise_bench.noise_eager(x, True)
    return calls


def launch_costs(device: torch.device, rounds: int = 11,
                 calls_per_block: int = 200) -> dict[str, float]:
    """{name: host us a call} of --launches on device: medians over interleaved rounds."""
    with _single_thread():
        specs = _launch_specs(device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for fn in specs.values():  # warm up: compiles, caches, allocator
            for _ in range(3):
                fn()
        sync()
        blocks = {name: lambda fn=fn: _block(fn, calls_per_block, grad=False)
                  for name, fn in specs.items()}
        samples = _rounds(blocks, rounds, after=sync)
    return {name: statistics.median(v) for name, v in samples.items()}


def _round5(us: float) -> float:
    return max(0.0, 5.0 * round(us / 5.0))


def table(result: dict[str, dict[str, float]]) -> str:
    """The figures as host_us entries (rounded to 5 us), each op's exact value beside them."""
    lines = []
    for figure in result:
        entries = ", ".join(f'"{op}": {_round5(us):.1f}' for op, us in result[figure].items())
        exact = ", ".join(f"{op} {us:.1f}" for op, us in result[figure].items())
        lines.append(f'"{figure}": {{{entries}}},  # {exact}')
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead",
                                     description=__doc__.split("\n\n")[1])
    parser.add_argument("--op", action="append", choices=OPS, help="op (repeatable; default all)")
    parser.add_argument("--rounds", type=int, default=21, help="interleaved rounds (default 21)")
    parser.add_argument("--block-ms", type=float, default=20.0,
                        help="time of one block of calls (default 20 ms)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print the recorded kernels and the raw medians (us)")
    parser.add_argument("--launches", action="store_true",
                        help="measure the host cost of launches and of whole calls on --device "
                        "instead (see the module docstring)")
    parser.add_argument("--device", default="cpu", help="with --launches: cpu or cuda")
    parser.add_argument("--out", type=Path, help="with --launches: also write the figures to "
                        "this CSV (name, host_us_per_call, device, torch, date)")
    args = parser.parse_args()
    if args.launches:
        device = torch.device(args.device)
        result = launch_costs(device, rounds=min(args.rounds, 11))
        for name, us in result.items():
            print(f"{name:<22} {us:8.1f} us")
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            stamp = datetime.date.today().isoformat()
            with args.out.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["name", "host_us_per_call", "device", "torch", "date"])
                for name, us in result.items():
                    writer.writerow([name, f"{us:.2f}", str(device), torch.__version__, stamp])
        return
    result = measure(tuple(args.op or OPS), args.rounds, args.block_ms, args.verbose)
    print(table(result))


if __name__ == "__main__":
    main()
