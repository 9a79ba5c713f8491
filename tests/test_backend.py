"""use_backend is per thread and per asyncio task, and traces without graph breaks."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import pyprune
from pyprune import _backend


def test_use_backend_is_per_thread():
    """While one thread is inside use_backend('cuda') (which cannot run here), plain calls in
    another thread take the automatic choice."""
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def forcing():
        with pyprune.use_backend("cuda"):
            seen["forcing"] = _backend.current()
            inside.set()
            done.wait(10)

    thread = threading.Thread(target=forcing)
    thread.start()
    try:
        assert inside.wait(10)
        x = torch.randn(3, 20)
        assert _backend.current() == _backend._DEFAULT
        torch.testing.assert_close(pyprune.kwta(x, 0.5), pyprune.reference.kwta(x, 10))
    finally:
        done.set()
        thread.join()
    assert seen["forcing"] == "cuda"


def test_use_backend_is_per_task():
    async def task(name, entered, release):
        with pyprune.use_backend(name):
            entered.set()
            await release.wait()
            return _backend.current(), _backend.select("kwta", torch.ones(2, 2))

    async def main():
        events = [asyncio.Event() for _ in range(3)]
        ref = asyncio.create_task(task("reference", events[0], events[2]))
        cpu = asyncio.create_task(task("cpu", events[1], events[2]))
        await events[0].wait()
        await events[1].wait()
        outside = _backend.current()
        events[2].set()
        return outside, await ref, await cpu

    outside, ref, cpu = asyncio.run(main())
    assert outside == _backend._DEFAULT
    assert ref == ("reference", "reference") and cpu == ("cpu", "cpu")


def test_compiled_function_follows_use_backend():
    """The choice is read while tracing without a graph break, and a compiled function called
    under another backend recompiles for it instead of reusing the first choice."""
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(lambda x: pyprune.kwta(x, 0.5), fullgraph=True, backend=counter)
    x = torch.randn(3, 20)
    compiled(x)
    assert counter.frame_count == 1
    with pyprune.use_backend("cuda"), pytest.raises(Exception, match="backend 'cuda' cannot run"):
        compiled(x)
    with pyprune.use_backend("reference"):
        torch.testing.assert_close(compiled(x), pyprune.reference.kwta(x, 10))
    compiled(x)
    assert counter.frame_count == 2  # auto, reference (the cuda trace raised)
