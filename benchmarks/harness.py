"""Benchmark machinery shared by every op: providers, steps, timing, peak memory, CSV and plots.

Adding an op
------------
Write ``benchmarks/<op>.py`` with

* ``CASES: list[Case]``: the shapes (``Case.quick`` marks the ones ``--quick`` and pytest run);
* ``setup_<op>(case, provider, mode, device) -> Step``: builds inputs (the same for every
  provider: seeded), picks the function with ``provider_fn`` and returns ``build_step(...)``
  with the bytes the op must move in that mode.

The CLI (``python -m benchmarks``) and ``test_benchmarks.py`` (pytest-benchmark) find the module
by its name and call it; nothing else needs registering.

Method
------
* Providers: ``eager`` (the op as users write it in PyTorch), ``torch.compile`` of that same
  function (``dynamic=False``; dynamo is reset between cases, so every shape gets its own
  static graph), and ``pyprune-<backend>`` for each backend ``pyprune.backends(device)`` lists
  except ``reference`` (which is eager PyTorch again); triton only on CUDA (its CPU interpreter
  checks correctness, it is no benchmark). All providers of a case run in one process on the
  same inputs.
* Modes: ``forward`` runs under ``torch.no_grad()``; ``backward`` times
  ``torch.autograd.grad(out, inputs, grad, retain_graph=True)`` on a graph built once before
  timing, so only the backward runs; ``full`` is forward + backward from scratch.
* Timing: warm-up (the first call compiles / autotunes, then at least ``WARMUP_RUNS`` runs and
  ``WARMUP_S`` seconds), then per-run times of at least ``MIN_RUNS`` runs, more while they fit in
  the time budget; p20/p50/p80 over those runs. The providers of a case and mode are timed
  interleaved, one run of each in turn, so a shared machine's changing speed affects them
  alike. CPU: ``time.perf_counter`` around each run, Python's GC off. CUDA: a CUDA event pair
  around each run, and a 256 MiB buffer zeroed before each run so no run reads its inputs from
  the previous run's L2. The device is synchronised before that zeroing, so every run starts
  from an empty queue with the same head start for its host work (the zeroing's ~60-90 us of
  device time): without it, the queue of a round whose device time exceeds its host time grows
  run after run, and each provider's time would depend on the others' (a device-heavy eager
  run hid torch.compile's host time, and a faster pyprune host made the compiled run look
  faster).
* GB/s: the bytes the op must read and write (declared by the op per mode) / p50. The copy
  bandwidth is measured once per run with ``dst.copy_(src)`` of a large tensor (read + write)
  and stored as op ``copy`` in ``copy.csv``; "% copy" = GB/s / copy GB/s.
* Peak memory (MB = 1e6 bytes): the most memory allocated at once during one run, above what
  was allocated before it (inputs, and for ``backward`` the saved graph, are excluded; outputs
  and temporaries count). CUDA: ``torch.cuda.max_memory_allocated`` around one run. CPU: one run
  under ``torch.profiler`` with ``profile_memory=True``; the running sum of its allocation and
  free events in time order, maximised. The profiler sees every allocation of torch's CPU
  allocator (ATen, inductor and extension kernels alike), not memory taken around it.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import gc
import importlib
import math
import os
import pkgutil
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

import pyprune

try:
    from tqdm import tqdm
except ImportError:  # the GPU machine has no tqdm and cannot install packages
    tqdm = None

# "backward" times torch.autograd.grad on one retained graph, which a compiled backward with
# donated buffers refuses (it frees the saved tensors): donation is switched off for the run.
import torch._functorch.config  # noqa: E402  (not loaded by import torch)

torch._functorch.config.donated_buffer = False

MODES = ("forward", "backward", "full")
EAGER = "eager"
COMPILE = "torch.compile"
PYPRUNE = "pyprune-"  # prefix of a pyprune backend's provider name

WARMUP_RUNS = 3
WARMUP_S = 0.05
MIN_RUNS = 10
MAX_RUNS = {"cpu": 200, "cuda": 2000}
BUDGET_S = {"cpu": 1.0, "cuda": 0.1}  # timed seconds per (case, provider, mode)
QUICK_BUDGET_S = {"cpu": 0.2, "cuda": 0.03}
COPY_BYTES = {"cpu": 256 * 2**20, "cuda": 2**30}
L2_FLUSH_BYTES = 256 * 2**20

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
SOURCES = ("setup.py", "csrc", "pyprune", "triton_kernels", "benchmarks/*.py")  # for the version
NOT_OPS = {"harness", "readme_table", "end_to_end"}  # modules of this package that hold no op


@dataclass(frozen=True)
class Case:
    """One benchmarked input: a shape, a dtype, and an op-specific variant (e.g. "channel")."""

    shape: tuple[int, ...]
    variant: str = ""
    dtype: torch.dtype = torch.float32
    quick: bool = False

    @property
    def label(self) -> str:
        """The CSV ``shape`` column: dims joined by 'x', then the variant, e.g. '8x64 channel'."""
        dims = "x".join(map(str, self.shape))
        return f"{dims} {self.variant}" if self.variant else dims


@dataclass(frozen=True)
class Step:
    """One timed run (``fn``) and the bytes it must read + write, for GB/s."""

    fn: Callable[[], Any]
    bytes: int


# setup_<op>(case, provider, mode, device) -> Step
Setup = Callable[[Case, str, str, torch.device], Step]


@dataclass(frozen=True)
class Row:
    """One CSV row; the field order is the column order, the same for every op."""

    op: str
    provider: str
    mode: str
    shape: str
    dtype: str
    p20_ms: float
    p50_ms: float
    p80_ms: float
    gbps: float
    peak_mb: float
    device: str
    torch: str
    version: str
    date: str


COLUMNS = tuple(f.name for f in dataclasses.fields(Row))
_FLOATS = {"p20_ms", "p50_ms", "p80_ms", "gbps", "peak_mb"}


# ---------------------------------------------------------------------------- providers, steps


def providers(device: str) -> list[str]:
    """Provider names for ``device`` ('cpu' or 'cuda'), eager first."""
    names = [EAGER, COMPILE]
    for backend in pyprune.backends(device):
        if backend == "reference" or (backend == "triton" and device != "cuda"):
            continue
        names.append(PYPRUNE + backend)
    return names


def provider_fn(
    provider: str, eager: Callable[..., Any], op: Callable[..., Any]
) -> Callable[..., Any]:
    """The function a provider runs: ``eager`` itself, ``torch.compile(eager)``, or the pyprune
    ``op`` with the provider's backend forced."""
    if provider == EAGER:
        return eager
    if provider == COMPILE:
        return torch.compile(eager, fullgraph=False, dynamic=False)
    if not provider.startswith(PYPRUNE):
        raise ValueError(f"unknown provider {provider!r}; expected {EAGER!r}, {COMPILE!r} or "
                         f"{PYPRUNE}<backend>")
    backend = provider.removeprefix(PYPRUNE)

    def forced(*args: Any) -> Any:
        with pyprune.use_backend(backend):
            return op(*args)

    return forced


def build_step(
    fn: Callable[..., Any],
    inputs: Sequence[Tensor],
    mode: str,
    nbytes: int,
    wrt: Sequence[int] = (0,),
) -> Step:
    """The timed run of ``fn(*inputs)`` in ``mode``, differentiating w.r.t. ``inputs[i]`` for i
    in ``wrt``; ``nbytes`` is what the op must read + write in that mode.

    Output gradients are seeded random tensors, so every provider gets the same ones.
    """
    if mode == "forward":

        def forward() -> Any:
            with torch.no_grad():
                return fn(*inputs)

        return Step(forward, nbytes)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    args = [t if t is None else t.detach().requires_grad_(i in wrt) for i, t in enumerate(inputs)]
    targets = [args[i] for i in wrt]

    def outputs() -> list[Tensor]:
        out = fn(*args)
        return [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]

    graph = outputs()
    gen = torch.Generator(device=graph[0].device).manual_seed(1)
    grads = [torch.randn(o.shape, dtype=o.dtype, device=o.device, generator=gen) for o in graph]
    if mode == "backward":
        return Step(lambda: torch.autograd.grad(graph, targets, grads, retain_graph=True), nbytes)
    del graph
    return Step(lambda: torch.autograd.grad(outputs(), targets, grads), nbytes)


# ---------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class Timing:
    """Percentiles of per-run times, in milliseconds."""

    p20_ms: float
    p50_ms: float
    p80_ms: float


def synchronized(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """fn, then a device synchronize on CUDA: for wall-clock timers such as pytest-benchmark's."""
    if device.type != "cuda":
        return fn

    def run() -> Any:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def _warm_up(fn: Callable[[], Any], device: torch.device) -> float:
    """Run fn until it is warm; return the fastest warm run's wall time in seconds."""
    run = synchronized(fn, device)
    run()  # compiles, autotunes, allocates
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < WARMUP_RUNS or time.perf_counter() - start < WARMUP_S:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


def time_step(fn: Callable[[], Any], device: torch.device, budget_s: float) -> Timing:
    """p20/p50/p80 of per-run times of fn, after warm-up; at least MIN_RUNS runs."""
    return time_steps([fn], device, budget_s)[0]


def time_steps(fns: Sequence[Callable[[], Any]], device: torch.device,
               budget_s: float) -> list[Timing]:
    """time_step for several functions, interleaved run by run (fn 0, fn 1, ..., fn 0, ...),
    so that a change of the machine's speed during the measurement (a shared host) hits every
    function alike and their ratios stay true. Each gets its own number of runs."""
    runs = []
    for fn in fns:
        estimate = _warm_up(fn, device)
        runs.append(min(max(MIN_RUNS, math.ceil(budget_s / max(estimate, 1e-6))),
                        MAX_RUNS[device.type]))
    times: list[list[float]] = [[] for _ in fns]
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if device.type == "cuda":
            _cuda_times(fns, device, runs, times)
        else:
            for r in range(max(runs)):
                for fn, n, out in zip(fns, runs, times):
                    if r < n:
                        t0 = time.perf_counter()
                        fn()
                        out.append((time.perf_counter() - t0) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    timings = []
    for t in times:
        deciles = statistics.quantiles(t, n=10, method="inclusive")
        timings.append(Timing(p20_ms=deciles[1], p50_ms=deciles[4], p80_ms=deciles[7]))
    return timings


def _cuda_times(fns: Sequence[Callable[[], Any]], device: torch.device, runs: list[int],
                times: list[list[float]]) -> None:
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    events: list[list[tuple]] = [[] for _ in fns]
    for r in range(max(runs)):
        for fn, n, ev in zip(fns, runs, events):
            if r >= n:
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            # An empty queue before each run: the run's time is its own, never another
            # provider's device work hiding its host time (see the module doc).
            torch.cuda.synchronize(device)
            flush.zero_()
            start.record()
            fn()
            end.record()
            ev.append((start, end))
    torch.cuda.synchronize(device)
    for ev, out in zip(events, times):
        out.extend(start.elapsed_time(end) for start, end in ev)


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: kineto logs every profiler start and stop there,
    whatever KINETO_LOG_LEVEL says, which would garble the progress bar."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory of one run of fn above what was allocated before it, in MB (see module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 1e6
    activities = [torch.profiler.ProfilerActivity.CPU]
    with _stderr_silenced(), torch.profiler.profile(activities=activities,
                                                    profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    allocated = peak = 0
    for _, nbytes in events:
        allocated += nbytes
        peak = max(peak, allocated)
    return peak / 1e6


# ---------------------------------------------------------------------------- one run's metadata


@dataclass(frozen=True)
class RunInfo:
    """What every row of one run shares: device, versions, date, and the timing budget."""

    device: torch.device
    device_name: str
    results_name: str  # the directory under results/
    torch: str
    version: str
    date: str
    budget_s: float

    @classmethod
    def create(cls, device: torch.device, quick: bool) -> RunInfo:
        return cls(
            device=device,
            device_name=device_name(device),
            results_name=device_dir(device),
            torch=torch.__version__,
            version=_pyprune_version(),
            date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
            budget_s=(QUICK_BUDGET_S if quick else BUDGET_S)[device.type],
        )

    def row(self, op: str, provider: str, mode: str, case: Case, t: Timing, gbps: float,
            peak_mb: float) -> Row:
        return Row(op=op, provider=provider, mode=mode, shape=case.label,
                   dtype=str(case.dtype).removeprefix("torch."), p20_ms=t.p20_ms,
                   p50_ms=t.p50_ms, p80_ms=t.p80_ms, gbps=gbps, peak_mb=peak_mb,
                   device=self.device_name, torch=self.torch, version=self.version,
                   date=self.date)


def device_name(device: str | torch.device) -> str:
    """A readable name: the GPU's, or the CPU model with torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({torch.get_num_threads()} threads)"


def device_dir(device: str | torch.device) -> str:
    """The results folder of a device: 'cpu', or the GPU's name in lower case with dashes
    (e.g. 'nvidia-h100-80gb-hbm3')."""
    device = torch.device(device)
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return "cpu"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _pyprune_version() -> str:
    """pyprune's version, the git commit when there is a checkout, and ".dirty" when the
    measured sources (not results or docs) differ from that commit."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", *SOURCES)
    except (OSError, subprocess.CalledProcessError):
        return pyprune.__version__
    return f"{pyprune.__version__}+g{commit}{'.dirty' if dirty else ''}"


# ---------------------------------------------------------------------------- running


def copy_bandwidth(info: RunInfo) -> Row:
    """The copy baseline: dst.copy_(src) of a large float32 tensor, read + write bytes / p50."""
    numel = COPY_BYTES[info.device.type] // 4
    src = torch.randn(numel, device=info.device)
    dst = torch.empty_like(src)
    step = Step(lambda: dst.copy_(src), 2 * numel * 4)
    case = Case((numel,))
    return _measure(info, "copy", EAGER, "forward", case, step)


def store_copy_bandwidth(path: Path, row: Row) -> None:
    """Keep one copy-bandwidth row per device in copy.csv: the results of a folder may come from
    several machines (one per op run), and each op's "% copy" uses its own machine's row."""
    rows = [r for r in read_csv(path) if r.device != row.device] if path.exists() else []
    write_csv(path, rows + [row])


def copy_gbps_for(path: Path, device: str) -> float | None:
    """The copy bandwidth stored for ``device`` in copy.csv, if any."""
    if not path.exists():
        return None
    return next((r.gbps for r in read_csv(path) if r.device == device), None)


def _measure(info: RunInfo, op: str, provider: str, mode: str, case: Case, step: Step) -> Row:
    timing = time_step(step.fn, info.device, info.budget_s)
    peak = peak_memory_mb(step.fn, info.device)
    return info.row(op, provider, mode, case, timing, step.bytes / timing.p50_ms / 1e6, peak)


def run_case(info: RunInfo, op: str, setup: Setup, case: Case,
             progress: Progress) -> list[Row]:
    """Every provider x mode of one case, eager first within each mode; the providers of a mode
    are timed together, interleaved (see time_steps)."""
    torch._dynamo.reset()
    rows = []
    for mode in MODES:
        names = providers(info.device.type)
        steps = []
        for provider in names:
            progress.describe(f"{op} {case.label} {mode} {provider} (warm-up)")
            steps.append(setup(case, provider, mode, info.device))
        progress.describe(f"{op} {case.label} {mode} (timing {len(names)} providers)")
        timings = time_steps([s.fn for s in steps], info.device, info.budget_s)
        for provider, step, timing in zip(names, steps, timings):
            peak = peak_memory_mb(step.fn, info.device)
            rows.append(info.row(op, provider, mode, case, timing,
                                 step.bytes / timing.p50_ms / 1e6, peak))
            progress.advance()
        del steps
    return rows


def warm_case(op: str, setup: Setup, case: Case, device: torch.device) -> None:
    """Run every provider x mode of one case once, as ``run_case`` would before timing, and
    time nothing: torch.compile's graphs and the Triton kernels land in their on-disk caches,
    which a later process's ``run_case`` then reads instead of compiling. A provider that fails
    is reported and skipped: the timed run reports it again."""
    torch._dynamo.reset()
    for mode in MODES:
        for provider in providers(device.type):
            try:
                synchronized(setup(case, provider, mode, device).fn, device)()
            except Exception as e:  # noqa: BLE001 - reported; the timed run raises it again
                print(f"warm: {op} {case.label} {mode} {provider}: {type(e).__name__}: {e}",
                      flush=True)


def stored_cases(path: Path, info: RunInfo, labels: Sequence[str]) -> dict[str, list[Row]]:
    """The rows of ``path`` (if it exists) on ``info``'s device, by case, for the cases among
    ``labels`` (rows of cases no longer listed are dropped)."""
    by_case: dict[str, list[Row]] = {}
    if path.exists():
        for row in read_csv(path):
            if row.device == info.device_name and row.shape in labels:
                by_case.setdefault(row.shape, []).append(row)
    return by_case


def complete_cases(path: Path, info: RunInfo, labels: Sequence[str]) -> tuple[list[Row], set[str]]:
    """The rows of ``path`` (if it exists) for the cases among ``labels`` that it holds in full
    on ``info``'s device (every provider and mode) and measured by ``info``'s pyprune version
    (an older version's rows are measured again), and those cases' labels."""
    want = {(p, m) for p in providers(info.device.type) for m in MODES}
    by_case = stored_cases(path, info, labels)
    done = {label for label, rs in by_case.items()
            if {(r.provider, r.mode) for r in rs} >= want
            and all(r.version == info.version for r in rs)}
    return [r for label in labels if label in done for r in by_case[label]], done


def merged_rows(labels: Sequence[str], measured: dict[str, list[Row]],
                stored: dict[str, list[Row]]) -> list[Row]:
    """The rows of each case in ``labels`` order: this run's where it measured the case, else
    the stored ones (their version and date columns say which run measured them), so a run
    stopped by a time limit loses no case it did not reach."""
    return [r for label in labels for r in measured.get(label, stored.get(label, []))]


class Progress:
    """A tqdm bar, or one stderr line per item where tqdm is not installed."""

    def __init__(self, total: int) -> None:
        self._bar = tqdm(total=total, unit="measurement", dynamic_ncols=True) if tqdm else None
        self._total, self._done = total, 0

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description(text)
        else:
            print(f"[{self._done + 1}/{self._total}] {text}", file=sys.stderr, flush=True)

    def advance(self, n: int = 1) -> None:
        self._done += n
        if self._bar is not None:
            self._bar.update(n)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def discover_ops() -> dict[str, ModuleType]:
    """Every ``benchmarks/<op>.py`` that defines ``setup_<op>``, by op name."""
    ops = {}
    for info in pkgutil.iter_modules([str(HERE)]):
        if info.name.startswith(("_", "test_")) or info.name in NOT_OPS:
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        if hasattr(module, f"setup_{info.name}"):
            ops[info.name] = module
    return ops


def setup_of(op: str, module: ModuleType) -> Setup:
    return getattr(module, f"setup_{op}")


# ---------------------------------------------------------------------------- CSV and plots


def write_table(path: Path, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A CSV of ``columns`` and ``rows`` (floats to 6 significant digits), written through a
    temporary file and a rename, so that a run stopped while writing leaves the previous
    complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(f"{v:.6g}" if isinstance(v, float) else v for v in row)
    os.replace(partial, path)


def write_csv(path: Path, rows: Sequence[Row]) -> None:
    """The benchmark rows to path (``write_table``)."""
    write_table(path, COLUMNS, (dataclasses.astuple(row) for row in rows))


def read_csv(path: Path) -> list[Row]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames}, expected {list(COLUMNS)}")
        return [
            Row(**{k: float(v) if k in _FLOATS else v for k, v in record.items()})
            for record in reader
        ]


def speedups(rows: Sequence[Row]) -> dict[Row, float]:
    """Each row's speed-up over the eager row of the same op, shape, dtype and mode."""
    eager = {(r.op, r.shape, r.dtype, r.mode): r.p50_ms for r in rows if r.provider == EAGER}
    return {
        r: eager[(r.op, r.shape, r.dtype, r.mode)] / r.p50_ms
        for r in rows
        if (r.op, r.shape, r.dtype, r.mode) in eager
    }


def plot_csv(path: Path) -> Path:
    """Grouped bars of speed-up vs eager, shape x provider, one panel per mode; returns the PNG."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(path)
    ratio = speedups(rows)
    shapes = list(dict.fromkeys(r.shape for r in rows))
    names = [p for p in dict.fromkeys(r.provider for r in rows) if p != EAGER]
    modes = [m for m in MODES if any(r.mode == m for r in rows)]
    width = 0.8 / max(len(names), 1)
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(8.0, 1.3 * len(shapes)), 3.2 * len(modes)),
                             sharex=True, squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        for i, name in enumerate(names):
            by_shape = {r.shape: ratio[r] for r in rows
                        if r.mode == mode and r.provider == name and r in ratio}
            xs = [j + (i - (len(names) - 1) / 2) * width for j, s in enumerate(shapes)
                  if s in by_shape]
            ys = [by_shape[s] for s in shapes if s in by_shape]
            bars = ax.bar(xs, ys, width, label=name)
            ax.bar_label(bars, [f"{y:.1f}" for y in ys], fontsize=7, padding=1)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        # Ratios: a log scale keeps 0.5x and 2x equally far from 1x and one outlier readable.
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}x"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.margins(y=0.15)
        ax.set_ylabel(f"{mode}: speed-up vs eager")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    axes[-1, 0].set_xticks(range(len(shapes)), shapes, rotation=20, ha="right", fontsize=8)
    first = rows[0]
    fig.suptitle(f"{first.op} ({first.dtype}) on {first.device}\n"
                 f"torch {first.torch}, pyprune {first.version}, {first.date}", fontsize=10)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
