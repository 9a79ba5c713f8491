"""Data-parallel training over every pyprune layer: DDP and FSDP2 (``fully_shard``) on 2 gloo
processes against one process.

What is compared:

- Deterministic draws (``random=False``): KWTA (sample and channel groups), CAS with labels,
  MaskedConv2d with static bool masks, ChannelGate feeding masked_conv2d, ChipMask,
  MagnitudePruned and NoisyWeight. NoisyWeight is random, but its noise lies on the weight, not
  on the batch: seeded alike, every rank and the single process draw the same noise. The single
  process runs the whole global batch in one forward; the ranks run its halves. Logits at every
  step, the trained parameters and eval-mode logits (CAS by argmax, MaskedConv2d's compact
  path) must agree in float64.
- Random activations (``random=True``): the same model with SAP and GaussianNoise added, each
  rank seeded by ``pyprune.seed_per_rank``. Their draws depend on a sample's position in its
  call's batch, so one forward over the global batch cannot draw what the two ranks draw; the
  single process runs the global batch as two micro-batches (gradient accumulation, the loss of
  each halved as DDP's average does), micro-batch r drawing from torch.manual_seed(seed + r)'s
  generator state as rank r does. It checks that the ranks' gradients are exactly those of
  their own draws (SAP's and the noise's backward regenerate them from the seed) and are
  averaged as in one process.
- Seeding: with one seed on both ranks, SAP and GaussianNoise give the same output for the same
  input on both ranks; with ``seed_per_rank``, different outputs.
- FSDP2 gives no "returned a view tensor" warning: kwta, sap, cas and gaussian_noise return
  tensors that are not views where they require grad (pyprune/ops/_common.py, ``restored``).
"""
from __future__ import annotations

import datetime
import os
import tempfile
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import pyprune
from pyprune import nn as pnn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
LOCAL_BATCH = 4
STEPS = 3
SEED = 1234
CLASSES = 10
TOL = dict(atol=1e-10, rtol=1e-9)  # float64; only summation orders differ


class Stem(nn.Sequential):
    def __init__(self) -> None:
        conv = pnn.MaskedConv2d(3, 8, 3, padding=1)
        conv.set_masks(in_mask=torch.tensor([True, True, False]),
                       out_mask=torch.tensor([True, True, False, True, True, True, False, True]))
        super().__init__(conv, pnn.ChipMask(8), pnn.KWTA(0.5))


class Gated(nn.Module):
    """FBS: ChannelGate's per-sample top-k channels gate a masked convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = pnn.ChannelGate(8, 8, keep_ratio=0.5)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        mask, scale = self.gate(x)
        y = pyprune.masked_conv2d(x, self.conv.weight, self.conv.bias, padding=1, out_mask=mask)
        return y * scale[:, :, None, None]


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = pnn.MagnitudePruned(nn.Conv2d(8, 8, 3, padding=1), keep_ratio=0.5)
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class Net(nn.Module):
    def __init__(self, random: bool) -> None:
        super().__init__()
        self.stem = Stem()
        self.gated = Gated()
        self.noisy = nn.Sequential(pnn.NoisyWeight(nn.Conv2d(8, 8, 3, padding=1), std=0.05),
                                   pnn.SAP(samples=100) if random else pnn.KWTA(k=20, mode="channel"))
        self.noise = pnn.GaussianNoise(0.1) if random else nn.Identity()
        self.cas = pnn.CAS(8, CLASSES)
        self.head = Head()

    def forward(self, x, label=None):
        x = self.noise(self.noisy(self.gated(self.stem(x))))
        x, cas_logits = self.cas(x, label)
        return self.head(x), cas_logits


def build(random: bool) -> Net:
    torch.manual_seed(0)  # the same initial parameters in every process
    return Net(random).double()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global batch of a step (step -1: the eval batch)."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(WORLD * LOCAL_BATCH, 3, 8, 8, dtype=torch.float64, generator=g)
    return x, torch.randint(CLASSES, (WORLD * LOCAL_BATCH,), generator=g)


def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]


def loss_of(model, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    logits, cas_logits = model(x, y)
    return F.cross_entropy(logits, y) + pyprune.cas_loss([cas_logits], y), logits


def optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


# --- the distributed run ------------------------------------------------------------------

def _train_rank(rank: int, wrapper: str, random: bool) -> dict:
    model = build(random)
    if wrapper == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        for block in (model.stem, model.gated, model.noisy, model.noise, model.cas, model.head):
            fully_shard(block, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    if random:
        assert pyprune.seed_per_rank(SEED) == SEED + rank
    else:
        torch.manual_seed(SEED)
    opt = optimizer(wrapped)
    logits = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            x, y = batch(step)
            loss, out = loss_of(wrapped, shard(x, rank), shard(y, rank))
            opt.zero_grad()
            loss.backward()
            opt.step()
            logits.append(out.detach())
        wrapped.eval()
        with torch.no_grad():
            eval_logits = wrapped(shard(batch(-1)[0], rank))[0]
    params = {name: p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
              for name, p in model.named_parameters()}
    return {"logits": logits, "eval": eval_logits, "params": params,
            "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}


def _seeding_rank(rank: int) -> dict:
    """The same input on both ranks, through SAP and GaussianNoise: one seed, then seed_per_rank."""
    x = torch.rand(LOCAL_BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    sap, noise = pnn.SAP(samples=50), pnn.GaussianNoise(0.5)
    outputs = {}
    for how in ("same_seed", "seed_per_rank"):
        if how == "same_seed":
            torch.manual_seed(SEED)
        else:
            pyprune.seed_per_rank(SEED)
        outputs[how] = (sap(x), noise(x))
    return outputs


JOBS = [("train", wrapper, random) for wrapper in ("ddp", "fsdp2") for random in (False, True)]
JOBS.append(("seeding",))


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # 2 processes on 2 cores
    # A rank that fails leaves the other waiting in a collective: time out instead of hanging.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    results = {}
    try:
        for job in JOBS:
            try:
                results[job] = _seeding_rank(rank) if job[0] == "seeding" else _train_rank(rank, *job[1:])
            except Exception:  # reported by the test of this job
                results[job] = traceback.format_exc()
            dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def distributed_results() -> dict:
    """Every job of JOBS, run once on WORLD spawned gloo processes (one start-up for all):
    {job: [result of rank 0, result of rank 1]}. The group meets through a file, not a TCP
    port, so parallel test runs cannot collide."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
                 for r in range(WORLD)]
    return {job: [r[job] for r in ranks] for job in JOBS}


def results_of(distributed_results: dict, job: tuple) -> list:
    ranks = distributed_results[job]
    for rank, result in enumerate(ranks):
        if isinstance(result, str):
            pytest.fail(f"rank {rank} of {job} raised:\n{result}")
    return ranks


# --- the single process ---------------------------------------------------------------------

def train_single(random: bool) -> dict:
    """The global batch in one process: one forward (random=False), or as WORLD micro-batches
    each drawing from its rank's generator state (random=True)."""
    model = build(random)
    opt = optimizer(model)
    states = []
    if random:
        for r in range(WORLD):
            torch.manual_seed(SEED + r)
            states.append(torch.get_rng_state())
    else:
        torch.manual_seed(SEED)
    logits = []
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad()
        if random:
            outs = []
            for r in range(WORLD):
                torch.set_rng_state(states[r])
                loss, out = loss_of(model, shard(x, r), shard(y, r))
                (loss / WORLD).backward()
                states[r] = torch.get_rng_state()
                outs.append(out.detach())
            logits.append(torch.cat(outs))
        else:
            loss, out = loss_of(model, x, y)
            loss.backward()
            logits.append(out.detach())
        opt.step()
    model.eval()
    x = batch(-1)[0]
    with torch.no_grad():
        if random:
            evals = []
            for r in range(WORLD):
                torch.set_rng_state(states[r])
                evals.append(model(shard(x, r))[0])
            eval_logits = torch.cat(evals)
        else:
            eval_logits = model(x)[0]
    return {"logits": logits, "eval": eval_logits,
            "params": {name: p.detach() for name, p in model.named_parameters()}}


def _assert_matches(ranks: list[dict], single: dict) -> None:
    for step in range(STEPS):
        got = torch.cat([r["logits"][step] for r in ranks])
        torch.testing.assert_close(got, single["logits"][step], **TOL, msg=f"logits, step {step}")
    torch.testing.assert_close(torch.cat([r["eval"] for r in ranks]), single["eval"], **TOL,
                               msg="eval-mode logits")
    for r in ranks:
        assert r["params"].keys() == single["params"].keys()
        for name, p in single["params"].items():
            torch.testing.assert_close(r["params"][name], p, **TOL, msg=f"parameter {name}")
    # The comparison means something: training moved every parameter.
    initial = dict(build(False).named_parameters())
    for name, p in single["params"].items():
        if name in initial:
            assert not torch.equal(p, initial[name].detach()), f"{name} did not train"


def _view_warnings(ranks: list[dict]) -> list[str]:
    return [w for r in ranks for w in r["warnings"] if "view" in w]


@pytest.mark.parametrize("random", [False, True], ids=["deterministic", "random"])
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_data_parallel_matches_single_process(distributed_results, wrapper, random):
    ranks = results_of(distributed_results, ("train", wrapper, random))
    _assert_matches(ranks, train_single(random))
    assert _view_warnings(ranks) == []


def test_seed_per_rank_gives_ranks_their_own_draws(distributed_results):
    ranks = results_of(distributed_results, ("seeding",))
    for a, b in zip(ranks[0]["same_seed"], ranks[1]["same_seed"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)   # the pitfall: identical draws
    sap0, noise0 = ranks[0]["seed_per_rank"]
    sap1, noise1 = ranks[1]["seed_per_rank"]
    assert not torch.equal(sap0 != 0, sap1 != 0)           # different SAP masks
    assert not torch.equal(noise0, noise1)
    # Rank r's draws are those of seed + r, replayable in one process.
    for r, (sap_r, noise_r) in enumerate([(sap0, noise0), (sap1, noise1)]):
        torch.manual_seed(SEED + r)
        x = torch.rand(LOCAL_BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(pnn.SAP(samples=50)(x), sap_r, atol=0, rtol=0)
        torch.testing.assert_close(pnn.GaussianNoise(0.5)(x), noise_r, atol=0, rtol=0)


def test_seed_per_rank_outside_a_group(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert pyprune.seed_per_rank(5) == 5
    first = torch.rand(3)
    monkeypatch.setenv("RANK", "3")
    assert pyprune.seed_per_rank(5) == 8
    assert pyprune.seed_per_rank(5, rank=0) == 5
    torch.testing.assert_close(torch.rand(3), first, atol=0, rtol=0)
    with pytest.raises(ValueError, match="rank"):
        pyprune.seed_per_rank(5, rank=-1)
    with pytest.raises(TypeError, match="seed"):
        pyprune.seed_per_rank(1.5)


def test_outputs_are_not_views(device_backend):
    """What FSDP2 warns about (an output with ``_base`` set), checked in one process for each
    kernel backend on every layout the ops keep without a copy. (The reference backend is
    plain eager PyTorch, whose reshapes may return views.)"""
    device, backend = device_backend
    if backend == "reference":
        pytest.skip("the reference backend is eager PyTorch")
    layouts = {
        "contiguous": lambda t: t,
        "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
        "permuted": lambda t: t.permute(0, 1, 3, 2),
    }
    for name, layout in layouts.items():
        x = layout(torch.randn(2, 4, 5, 6, device=device)).requires_grad_()
        outputs = {
            "kwta": pyprune.kwta(x, 0.5),
            "kwta channel": pyprune.kwta(x, k=3, mode="channel"),
            "sap": pyprune.sap(x),
            "sap bernoulli": pyprune.sap(x, exact=False),
            "gaussian_noise": pyprune.gaussian_noise(x, 0.1),
            "cas": pyprune.cas(x, torch.randn(3, 4, device=device),
                               label=torch.tensor([0, 2], device=device))[0],
        }
        for op, out in outputs.items():
            assert not out._is_view(), f"{op} returned a view ({name})"
            assert out.stride() == x.stride(), f"{op} changed the layout ({name})"
            out.sum().backward()
