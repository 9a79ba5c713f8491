"""Zeroed int32 counters for the kernels that hand work between programs of one launch.

A launch that counts with atomics (tickets, programs done per sample) needs its counters zero
when it starts. A fill before each launch costs a launch of its own (device time and host time
at small sizes). Instead, a kernel given these counters returns every counter it touches to
zero before it ends (the last program to use a counter resets it), and the counters are kept:
one buffer per (device, stream), grown by a fill when a launch needs more. The launches of one
stream run one after another, so each finds the zeros the previous one left; launches on other
streams have buffers of their own.

Under CUDA graph capture the counters are a fresh fill, captured with the graph: a graph may be
replayed on any stream, beside eager launches or other graphs, and must not share a buffer
with them. A launch that raises has its buffer zeroed again (on leaving ``counters``) so that no later launch
meets the counts of one that stopped part way (under the interpreter; on the GPU a launch
either starts every program or none).
"""
from __future__ import annotations

import torch

_MIN = 64  # counters a buffer holds at least (grown to twice what a launch needs)
_BUFFERS: dict[tuple, torch.Tensor] = {}


def _stream_key(device: torch.device) -> tuple | None:
    """(device, stream) of a launch on device's current stream, or None under capture."""
    if device.type != "cuda":
        return (device.type, device.index)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if torch.cuda.is_current_stream_capturing():
        return None
    return ("cuda", index, torch._C._cuda_getCurrentRawStream(index))


class counters:
    """``with counters(device, n) as count:`` at least n int32 counters, all zero, for a launch
    on device's current stream that leaves them all zero when it ends (see the module
    docstring); zeroed again if the launch inside raises (its programs may have stopped part
    way). Enter it in the launch's device context. A class, not contextlib: a launcher's host
    time counts at small sizes."""

    __slots__ = ("count",)

    def __init__(self, device: torch.device, n: int) -> None:
        key = _stream_key(device)
        if key is None:
            self.count = torch.zeros(n, dtype=torch.int32, device=device)
            return
        buffer = _BUFFERS.get(key)
        if buffer is None or buffer.numel() < n:
            buffer = _BUFFERS[key] = torch.zeros(max(_MIN, 2 * n), dtype=torch.int32,
                                                 device=device)
        self.count = buffer

    def __enter__(self) -> torch.Tensor:
        return self.count

    def __exit__(self, kind, value, traceback) -> bool:
        if kind is not None:
            self.count.zero_()
        return False
