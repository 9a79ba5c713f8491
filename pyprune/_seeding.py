"""Seeding pyprune's random ops per process of a distributed job."""
from __future__ import annotations

import os

import torch


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))  # set by torchrun before the group exists


def seed_per_rank(seed: int, *, rank: int | None = None) -> int:
    r"""Seed torch's default generators (CPU and every CUDA device, as ``torch.manual_seed``)
    with ``seed + rank`` and return that seed.

    pyprune's random ops (``sap``, ``gaussian_noise`` and the modules over them) draw a Philox
    seed from the generator at each call, and the random value of an element depends only on
    that seed and the element's place in the call's input. Seeded alike, every data-parallel
    rank therefore draws the same random numbers for the same positions of its local batch
    (SAP's draws for a rank's sample 3 are those for every other rank's sample 3, the same mask
    where the samples are equal; the noise is the same), so the global batch holds
    ``world_size`` copies of each draw instead of independent ones. Call this
    once per process to give each rank its own draws (and torch's own random ops, dropout, their
    own masks), with ``rank`` the process's global rank (default: that of the initialized
    ``torch.distributed`` group, else the ``RANK`` environment variable torchrun sets, else 0).

    Call it after the model is built and its parameters initialized alike on every rank: DDP
    broadcasts rank 0's parameters, but FSDP2's ``fully_shard`` keeps each rank's own values of
    its shard. The run stays reproducible: rank r always draws from ``seed + r``, so a single
    process can replay rank r's draws by ``torch.manual_seed(seed + r)``. For explicit
    generators, ``torch.Generator(device).manual_seed(seed + rank)`` passed as ``generator=``
    to ``pyprune.sap`` / ``pyprune.gaussian_noise`` does the same per call.

    Example:
        >>> dist.init_process_group("nccl")
        >>> torch.manual_seed(0); model = DDP(make_model().cuda())   # same initial weights
        >>> pyprune.seed_per_rank(0)                                   # rank r draws from 0 + r
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if rank is None:
        rank = _rank()
    elif isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be an int >= 0 or None, got {rank!r}")
    torch.manual_seed(seed + rank)
    return seed + rank
