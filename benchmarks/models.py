"""``python -m benchmarks.models``: ResNet-18, ResNet-50 and MobileNetV2 with half of their block
channels pruned, as PyTorch runs them and as pyprune does, on this machine's CPU.

Models: torchvision's ``resnet18``, ``resnet50`` and ``mobilenet_v2`` (random weights) when
torchvision imports, else this module's definitions of the same architectures (same module
names, so torchvision's state dicts load into them): ResNet with BasicBlock / Bottleneck (v1.5,
stride on the 3x3) and MobileNetV2's inverted residuals (1x1 expansion, 3x3 depthwise, ReLU6,
linear 1x1 projection).

Pruning: the channels inside each block, the ones Torch-Pruning's L1 pruner removes when asked
for the same channels: ResNet's BasicBlock conv1, Bottleneck conv1 and conv2, each MobileNetV2
block's expanded channels (expansion and depthwise convolution; the first block, which has no
expansion, stays whole). Each keeps the half of its output channels whose filters have the
largest L1 norm, as a pruned ``ChipMask`` after each BatchNorm of those channels
(``pyprune.convert(chip_masks=...)``); the residual stream and the classifier stay whole. The
BatchNorm statistics are random, so pruned channels matter and every variant is checked against
the masked model's outputs.

Variants, eval mode, ``torch.no_grad()``:

* dense: the unpruned model;
* masked, eager: the masked model as PyTorch runs it (masks multiply, convolutions stay dense;
  what ``torch.nn.utils.prune`` or a soft-mask training run leaves);
* mask_convolutions: ``pyprune.mask_convolutions`` (groups-1 convolutions skip the masked
  channels; same shapes; depthwise convolutions stay dense);
* compact: ``pyprune.compact`` (a smaller dense model, BatchNorms folded, weights channels_last);
* dense, compact: ``pyprune.compact`` of the unpruned model (nothing removed; BatchNorms folded,
  channels_last): the share of compact's speed that does not come from pruning.

Latency: p20/p50/p80 of per-run times (warm-up first), the variants of a model timed
interleaved in one process (``harness.time_steps``), at batch 4 and 224x224: ImageNet shapes,
at a batch that keeps the run near five minutes on two cores (``--batch`` and ``--size`` change
it). Params: the model's parameters (the masks' own excluded).
FLOPs: ``pyprune.count``: 2 per multiply-add of every convolution and Linear, per sample, of
the work each variant really does (a masked convolution counts its kept channels).

Writes ``benchmarks/results/<device>/models.csv`` and ``models.md`` (the table).
"""
from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

import pyprune

from . import harness

SEED = 0
KEEP = 0.5
MODELS = ("resnet18", "resnet50", "mobilenet_v2")


# ---------------------------------------------------------------- architectures


def _conv_bn_act(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 act: Optional[Callable[[], nn.Module]] = nn.ReLU6) -> nn.Sequential:
    """Conv2d (no bias) + BatchNorm2d + activation, named 0, 1, 2 as torchvision's
    Conv2dNormActivation."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet-18/34's block: two 3x3 convolutions; downsample (1x1 conv + BN) on a shape change."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = _downsample(cin, cout, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet-50's block: 1x1 reduce, 3x3 (stride here, v1.5), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, cout, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _downsample(cin: int, cout: int, stride: int) -> Optional[nn.Module]:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    def __init__(self, block: type, layers: tuple[int, ...], widths=(64, 128, 256, 512),
                 num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = widths[0]
        self.stages = len(layers)
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion (unless expand_ratio is 1), 3x3 depthwise, ReLU6 after
    both, linear 1x1 projection; a residual sum when the shape stays."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(cin * expand_ratio)
        self.use_res_connect = stride == 1 and cin == cout
        layers = [] if expand_ratio == 1 else [_conv_bn_act(cin, hidden, 1)]
        layers += [_conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def _divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class MobileNetV2(nn.Module):
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))  # expand ratio, channels, blocks, first stride

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, settings=SETTINGS,
                 in_channels: int = 3) -> None:
        super().__init__()
        cin = _divisible(32 * width_mult)
        last = _divisible(1280 * max(1.0, width_mult))
        features = [_conv_bn_act(in_channels, cin, 3, 2)]
        for t, c, n, s in settings:
            cout = _divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(_conv_bn_act(cin, last, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def resnet18(**kwargs) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), **kwargs)


def resnet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)


def mobilenet_v2(**kwargs) -> MobileNetV2:
    return MobileNetV2(**kwargs)


def build(name: str) -> tuple[nn.Module, str]:
    """(model, where its definition comes from): torchvision's when it imports, else ours."""
    try:
        import torchvision.models as tv
    except Exception:  # not installed, or its binary does not load with this torch
        return globals()[name](), "pyprune benchmarks.models"
    return getattr(tv, name)(weights=None), f"torchvision {tv.__name__}"


# ---------------------------------------------------------------- pruning


def block_masks(model: nn.Module) -> dict[str, str]:
    """The BatchNorms inside the blocks to mask, by name, each mapped to the convolution whose
    filters choose its channels (the two BatchNorms of a MobileNetV2 block's expanded channels
    share the expansion's)."""
    chosen = {}
    for name, m in model.named_modules():
        if hasattr(m, "conv1") and hasattr(m, "bn1") and hasattr(m, "downsample"):  # ResNet
            chosen[f"{name}.bn1"] = f"{name}.conv1"
            if hasattr(m, "conv3"):
                chosen[f"{name}.bn2"] = f"{name}.conv2"
        elif hasattr(m, "use_res_connect") and len(m.conv) == 4:  # expanded MobileNetV2 block
            chosen[f"{name}.conv.0.1"] = f"{name}.conv.0.0"
            chosen[f"{name}.conv.1.1"] = f"{name}.conv.0.0"
    return chosen


def prune_blocks(model: nn.Module, keep: float = KEEP) -> nn.Module:
    """A copy of model with a hard ChipMask after each BatchNorm of ``block_masks``, keeping
    the ``keep`` share of the channels whose filters have the largest L1 norm."""
    chosen = block_masks(model)
    if not chosen:
        raise ValueError("no ResNet or MobileNetV2 blocks found")
    pruned, _ = pyprune.convert(model, chip_masks=lambda name, bn: name in chosen)
    for bn, conv in chosen.items():
        w = model.get_submodule(conv).weight.detach()
        score = w.abs().flatten(1).sum(1)
        k = max(1, int(keep * len(score)))
        mask = torch.zeros(len(score), dtype=torch.bool)
        mask[score.topk(k).indices] = True
        chip = pruned.get_submodule(bn)[1]
        chip.hard_mask = mask.to(score.device)
        chip.psi.requires_grad_(False)
    return pruned


def randomize_batchnorms(model: nn.Module, seed: int = SEED) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (a trained model's are not the
    defaults, and the defaults hide mistakes: every channel the same)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                m.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
    return model


# ---------------------------------------------------------------- measurement


def params(model: nn.Module) -> int:
    """The model's parameters, without the masks' (ChipMask.psi)."""
    masks = sum(m.psi.numel() for m in model.modules() if isinstance(m, pyprune.nn.ChipMask))
    return sum(p.numel() for p in model.parameters()) - masks


def variants(name: str, example: torch.Tensor) -> tuple[dict[str, nn.Module], str]:
    torch.manual_seed(SEED)
    dense, source = build(name)
    dense = randomize_batchnorms(dense).eval()
    masked = prune_blocks(dense).eval()
    models = {
        "dense": dense,
        "masked, eager": masked,
        "mask_convolutions": pyprune.mask_convolutions(masked, example).eval(),
        "compact": pyprune.compact(masked, example),
        "dense, compact": pyprune.compact(dense, example),
    }
    with torch.no_grad():
        ref = masked(example)
        for v in ("mask_convolutions", "compact"):
            err = float((models[v](example) - ref).abs().max())
            scale = float(ref.abs().max())
            assert err <= 1e-4 * scale, f"{name} {v} differs from the masked model by {err}"
    return models, source


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.models",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", choices=MODELS,
                        help="model to run (repeatable; default: all three)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="timed seconds per variant (at least 10 runs each)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: benchmarks/results/<device>)")
    args = parser.parse_args(argv)
    names = args.model or list(MODELS)
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    info = dict(batch=args.batch, size=args.size, device=harness.device_name("cpu"),
                torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    print(f"{len(names)} models, batch {args.batch} at {args.size}x{args.size}, CPU, "
          f"{torch.get_num_threads()} threads; {KEEP:.0%} of the block channels kept", flush=True)
    rows = []
    for name in names:
        t0 = time.perf_counter()
        models, source = variants(name, x[:1])
        print(f"[{name}] built, pruned, masked and compacted ({source}) in "
              f"{time.perf_counter() - t0:.1f} s; timing {len(models)} variants ...", flush=True)

        def forward(m):
            def run():
                with torch.no_grad():
                    return m(x)
            return run

        t0 = time.perf_counter()
        timing = harness.time_steps([forward(m) for m in models.values()], torch.device("cpu"),
                                    args.budget)
        base = timing[0].p50_ms
        print(f"[{name}] timed in {time.perf_counter() - t0:.1f} s", flush=True)
        for (variant, m), t in zip(models.items(), timing):
            c = pyprune.count(m, x[:1])
            rows.append(dict(model=name, variant=variant, source=source, params=params(m),
                             gflops=c.flops / 1e9, p20_ms=t.p20_ms, p50_ms=t.p50_ms,
                             p80_ms=t.p80_ms, speedup=base / t.p50_ms))
            r = rows[-1]
            print(f"  {variant:18s} params {r['params']:>11,d}  GFLOPs {r['gflops']:6.3f}  "
                  f"p50 {r['p50_ms']:8.1f} ms  {r['speedup']:5.2f}x", flush=True)

    # other processes on the machine slow every variant alike (interleaved runs), but widen
    # the p20-p80 spread: the 1-minute load average at the end is recorded with the results
    info["load"] = f"{os.getloadavg()[0]:.1f}"
    out = args.out or harness.RESULTS / harness.device_dir("cpu")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "models.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) + list(info))
        writer.writeheader()
        for r in rows:
            writer.writerow({**{k: f"{v:.4f}" if isinstance(v, float) else v
                                for k, v in r.items()}, **info})
    table = markdown(rows, info)
    (out / "models.md").write_text(table)
    print("\n" + table)
    print(f"wrote {path} and {out / 'models.md'}")


def markdown(rows: list[dict], info: dict) -> str:
    lines = [f"Batch {info['batch']}, {info['size']}x{info['size']}, {info['device']}, torch "
             f"{info['torch']}, {info['date']}, load average {info['load']}; {KEEP:.0%} of the "
             f"block channels kept (`python -m benchmarks.models`).", "",
             "| model | variant | params | GFLOPs/sample | p50 ms (p20-p80) | speed-up vs dense |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['params']:,} | {r['gflops']:.3f} | "
                     f"{r['p50_ms']:.1f} ({r['p20_ms']:.1f}-{r['p80_ms']:.1f}) | "
                     f"{r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
