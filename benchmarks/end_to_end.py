"""``python -m benchmarks.end_to_end``: pruning that pays off, measured on this machine.

Trains a small ResNet on scikit-learn's bundled digits (1797 8x8 images, upsampled to 32x32; no
download), prunes it with CHIPNet to a 50% FLOP budget, fine-tunes it, and compares, at batch
64 on the CPU (eval mode, latency p50 over interleaved runs):

* dense: the trained model;
* masked, eager: the pruned model as PyTorch runs it (masks multiply, every conv stays dense:
  what torch.nn.utils.prune gives);
* masked, pyprune: the same model with ``pyprune.mask_convolutions`` (MaskedConv2d skips the
  masked channels; same shapes, same outputs; parameters channels_last, its default);
* compacted: ``pyprune.compact`` (a smaller dense model without the pruned channels, its
  BatchNorms folded into the convolutions, weights channels_last);
* dense, folded: ``pyprune.compact`` of the unpruned model (nothing removed, the same BatchNorm
  folding and layout): how much of the compacted model's speed comes from those alone;
* dense, channels_last: the dense model with its parameters channels_last, the layout of the
  masked pyprune model: how much of that one's speed comes from the layout alone.

Then unstructured pruning: every 3x3 convolution inside the blocks keeps the 10% (then 5%)
largest of its weights (``pyprune.magnitude_mask``, as ``MaskedConv2d`` weight masks), fine-tuned with the masks
fixed, and timed as PyTorch runs it (the masked weight in a dense conv, pyprune's reference
backend) and as pyprune does (the direct sparse convolution where the density pays), against the
dense model in the same interleaved measurement.

Then the training step time (forward + backward + optimizer step) of the dense ResNet with its
ReLUs swapped for k-WTA (ratio 0.1) and CAS after the last two stages, eager PyTorch (pyprune's
reference backend) vs pyprune's kernels.

Writes benchmarks/results/<device>/end_to_end.csv and end_to_end.png.
"""
from __future__ import annotations

import argparse
import copy
import csv
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import pyprune

from . import harness

SEED = 0
BATCH = 64
# Unstructured pruning: shares of each pruned convolution's weights kept.
KEEP_WEIGHTS = (0.1, 0.05)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet-18-style network for 32x32 single-channel images: three stages of two blocks."""

    def __init__(self, widths=(32, 64, 128), classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(Block(cin, w, 1 if i == 0 else 2), Block(w, w)))
            cin = w
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): 80/20 split, images upsampled to 32x32."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SEED))
    cut = int(0.8 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def magnitude_pruned(model: nn.Module, keep: float) -> nn.Module:
    """A copy of model whose 3x3 convolutions inside the blocks are MaskedConv2d with a weight
    mask keeping the `keep` share of their largest weights."""
    pruned = copy.deepcopy(model)
    for name, parent in list(pruned.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if (isinstance(child, nn.Conv2d) and child.kernel_size == (3, 3)
                    and full.startswith("layer")):
                conv = pyprune.nn.MaskedConv2d.from_conv(child)
                conv.weight_mask = pyprune.magnitude_mask(child.weight.detach(), keep)
                setattr(parent, child_name, conv)
    return pruned


def batches(x, y, shuffle_seed: int | None):
    order = (torch.randperm(len(y), generator=torch.Generator().manual_seed(shuffle_seed))
             if shuffle_seed is not None else torch.arange(len(y)))
    return [(x[order[i:i + BATCH]], y[order[i:i + BATCH]]) for i in range(0, len(y), BATCH)]


def train(model, x, y, epochs: int, lr: float, desc: str, step=None) -> None:
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=1e-4)
    model.train()
    for epoch in tqdm(range(epochs), desc=desc, leave=False):
        for xb, yb in batches(x, y, SEED + epoch):
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in batches(x, y, None)) / len(y)


def latencies(fns: dict, budget_s: float) -> dict:
    timings = harness.time_steps(list(fns.values()), torch.device("cpu"), budget_s)
    return {name: t for name, t in zip(fns, timings)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=6, help="dense training epochs")
    parser.add_argument("--prune-epochs", type=int, default=6, help="CHIPNet soft pruning epochs")
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--budget", type=float, default=0.5, help="FLOP budget kept")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(SEED)
    xtr, ytr, xte, yte = digits()
    print(f"digits: {len(ytr)} training and {len(yte)} test images, 32x32; "
          f"{torch.get_num_threads()} threads")

    dense = ResNet()
    train(dense, xtr, ytr, args.epochs, 2e-3, "dense training")
    acc_dense = accuracy(dense, xte, yte)
    print(f"dense: test accuracy {acc_dense:.2%}")

    # Masks inside the blocks: the channels they remove leave every layer that touches them.
    pruned, _ = pyprune.convert(dense, chip_masks=lambda name, bn: name.endswith("bn1")
                                and name.startswith("layer"))
    history = pyprune.chipnet.prune(pruned, batches(xtr, ytr, SEED), args.budget, "flops",
                                    epochs=args.prune_epochs, lr=1e-3, mask_lr=0.05)
    print(f"pruned to a {history[-1]['hard_budget']:.1%} FLOP budget (target {args.budget:.0%}): "
          f"test accuracy {accuracy(pruned, xte, yte):.2%} before fine-tuning")
    for m in pruned.modules():
        if isinstance(m, pyprune.nn.ChipMask):
            m.psi.requires_grad_(False)
    train(pruned, xtr, ytr, args.finetune_epochs, 1e-3, "fine-tuning")
    pruned.eval()
    example = xte[:BATCH]
    masked = pyprune.mask_convolutions(pruned, example).eval()
    compacted = pyprune.compact(pruned, example)
    with torch.no_grad():
        ref = pruned(example)
        for name, m in (("masked pyprune", masked), ("compacted", compacted)):
            err = float((m(example) - ref).abs().max())
            assert err < 1e-3, f"{name} differs from the pruned model by {err}"

    # The dense model with compact()'s inference rewrites (BatchNorm folded, channels_last) and
    # nothing pruned: the share of the compacted model's speed that does not come from pruning.
    dense_folded = pyprune.compact(dense.eval(), example)
    # The dense model in the masked pyprune model's layout: the share of its speed that the
    # layout alone gives.
    dense_cl = copy.deepcopy(dense).eval().to(memory_format=torch.channels_last)
    models = {"dense": dense.eval(), "masked, eager": pruned, "masked, pyprune": masked,
              "compacted": compacted, "dense, folded": dense_folded,
              "dense, channels_last": dense_cl}
    x = xte[:BATCH].contiguous()

    def forward(m):
        def run():
            with torch.no_grad():
                return m(x)
        return run

    timing = latencies({k: forward(m) for k, m in models.items()}, budget_s=3.0)
    rows = []
    base = timing["dense"].p50_ms
    print(f"\n{'model':20s} {'accuracy':>9s} {'params':>10s} {'MFLOPs':>8s} {'p50 ms':>8s} "
          f"{'speed-up':>9s}")

    def model_row(name, acc, c, t, base, note=""):
        rows.append(dict(item=name, accuracy=acc, params=c.params, mflops=c.flops / 1e6,
                         p20_ms=t.p20_ms, p50_ms=t.p50_ms, p80_ms=t.p80_ms,
                         speedup=base / t.p50_ms))
        print(f"{name:20s} {acc:9.2%} {c.params:10,d} {c.flops / 1e6:8.1f} {t.p50_ms:8.2f} "
              f"{base / t.p50_ms:8.2f}x{note}")

    for name, m in models.items():
        acc = acc_dense if name == "dense" else accuracy(m, xte, yte)
        model_row(name, acc, pyprune.count(m, x), timing[name], base)

    # Unstructured magnitude pruning of the blocks' 3x3 convolutions, fine-tuned.
    def forward_with(m, backend):
        def run():
            with torch.no_grad(), pyprune.use_backend(backend):
                return m(x)
        return run

    for keep in KEEP_WEIGHTS:
        sparse = magnitude_pruned(dense, keep)
        train(sparse, xtr, ytr, args.finetune_epochs, 1e-3, f"fine-tuning ({keep:.0%} of weights)")
        sparse.eval()
        label = f"unstructured {keep:.0%}"
        timing = latencies({"dense": forward(models["dense"]),
                            f"{label}, eager": forward_with(sparse, "reference"),
                            f"{label}, pyprune": forward_with(sparse, "auto")}, budget_s=3.0)
        base = timing["dense"].p50_ms
        acc = accuracy(sparse, xte, yte)
        c = pyprune.count(sparse, x)
        for name in (f"{label}, eager", f"{label}, pyprune"):
            model_row(name, acc, c, timing[name], base, f" (dense {base:.2f} ms in this measurement)")

    # Training step with k-WTA and CAS: eager (reference backend) vs pyprune kernels.
    robust, _ = pyprune.convert(ResNet(), relu=lambda: pyprune.nn.KWTA(0.1),
                                cas=["layer2", "layer3"], num_classes=10)
    optimizer = torch.optim.SGD(robust.parameters(), lr=1e-3)
    xb, yb = xtr[:BATCH], ytr[:BATCH]

    def step(backend):
        def run():
            with pyprune.use_backend(backend):
                pyprune.set_cas_label(robust, yb)
                out = robust(xb)
                loss = F.cross_entropy(out, yb) + pyprune.cas_loss(pyprune.cas_logits(robust), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return run

    robust.train()
    steps = latencies({"kwta+cas step, eager": step("reference"),
                       "kwta+cas step, pyprune": step("auto")}, budget_s=3.0)
    e, p = steps["kwta+cas step, eager"], steps["kwta+cas step, pyprune"]
    print(f"\ntraining step with k-WTA and CAS (batch {BATCH}): eager {e.p50_ms:.1f} ms, "
          f"pyprune {p.p50_ms:.1f} ms ({e.p50_ms / p.p50_ms:.2f}x)")
    for name, t in steps.items():
        rows.append(dict(item=name, accuracy="", params="", mflops="", p20_ms=t.p20_ms,
                         p50_ms=t.p50_ms, p80_ms=t.p80_ms, speedup=e.p50_ms / t.p50_ms))

    out = args.out or harness.RESULTS / harness.device_dir("cpu")
    out.mkdir(parents=True, exist_ok=True)
    info = dict(device=harness.device_name("cpu"), torch=torch.__version__,
                date=time.strftime("%Y-%m-%d"))
    path = out / "end_to_end.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) + list(info))
        writer.writeheader()
        for r in rows:
            writer.writerow({**{k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()},
                             **info})
    _plot(rows[:4], out / "end_to_end.png")
    print(f"\nwrote {path} and {out / 'end_to_end.png'}")


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["item"] for r in rows]
    ax.bar(names, [r["p50_ms"] for r in rows], color=["#888", "#c66", "#46a", "#4a6"])
    for i, r in enumerate(rows):
        ax.text(i, r["p50_ms"], f"{r['speedup']:.2f}x\n{r['accuracy']:.1%}", ha="center",
                va="bottom", fontsize=8)
    ax.set_ylabel(f"p50 latency, batch {BATCH} (ms)")
    ax.set_title("ResNet on digits, CHIPNet 50% FLOPs: latency and test accuracy")
    ax.set_ylim(0, max(r["p50_ms"] for r in rows) * 1.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
