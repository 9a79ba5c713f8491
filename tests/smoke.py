"""One small call of every CUDA and Triton kernel, forward and backward, for compute-sanitizer
(`python -m tests.smoke`, run by `make gpu`)."""
import torch

import pyprune


def _kwta(dtype):
    for shape, mode in [((4, 8, 5, 5), "channel"), ((3, 70001), "sample"),
                        ((2, 16, 32, 32), "sample")]:
        x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
        pyprune.kwta(x, 0.1, mode=mode).sum().backward()


def _sap_noise(dtype):
    x = torch.randn(3, 5, 7, 9, device="cuda", dtype=dtype, requires_grad=True)
    for exact in (True, False):
        pyprune.sap(x, 1.0, exact=exact).sum().backward()
    for multiplicative in (False, True):
        pyprune.gaussian_noise(x, 0.1, multiplicative=multiplicative).sum().backward()
    pyprune.magnitude_mask(x.detach(), 0.3)


def _cas(dtype):
    for shape in [(4, 32, 4, 4), (2, 40, 17, 17)]:
        x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.randn(5, shape[1], device="cuda", dtype=dtype, requires_grad=True)
        for label in (torch.randint(5, (shape[0],), device="cuda"), None):
            out, logits = pyprune.cas(x, w, None, label)
            (out.sum() + logits.sum()).backward()


def _masked_conv(dtype):
    x = torch.randn(3, 70, 11, 9, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(33, 70, 3, 3, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(33, device="cuda", dtype=dtype, requires_grad=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    masks = [None, torch.rand(70, device="cuda", generator=gen) < 0.5,
             torch.rand(3, 70, device="cuda", generator=gen) < 0.5]
    out_masks = [None, torch.rand(33, device="cuda", generator=gen) < 0.5,
                 torch.rand(3, 33, device="cuda", generator=gen) < 0.5]
    for in_mask in masks:
        for out_mask in out_masks:
            for stride in (1, 2):  # stride 1: grad_x by the forward kernel, transposed
                y = pyprune.masked_conv2d(x, w, b, stride, 1, in_mask=in_mask, out_mask=out_mask)
                y.sum().backward()
    # Soft per-sample masks (the CUDA and Triton kernels scale x on load and the output in their
    # epilogue, storing the unscaled output for the out_mask's gradient).
    soft_in = torch.rand(3, 70, device="cuda", generator=gen).to(dtype).requires_grad_()
    soft_out = torch.rand(3, 33, device="cuda", generator=gen).to(dtype).requires_grad_()
    for stride in (1, 2):
        y = pyprune.masked_conv2d(x, w, b, stride, 1, in_mask=soft_in, out_mask=soft_out)
        y.sum().backward()
    weight_mask = torch.rand(w.shape, device="cuda", generator=gen) < 0.3
    weight_mask[:16, :32] = False  # empty tiles for the block-sparse path
    for stride in (1, 2):
        y = pyprune.masked_conv2d(x, w, b, stride, 1, weight_mask=weight_mask)
        y.sum().backward()
    # Large enough for 128-pixel block-sparse tiles on 132 SMs, whose launch carries the dense
    # programs (Triton, GATED): an unstructured mask runs them (a grid of 25 x 4 block-sparse
    # programs, 2 past the dense grid's 49 x 2), a mask of whole 16x16 tiles the block-sparse ones.
    x = torch.randn(1, 64, 56, 56, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(64, 64, 3, 3, device="cuda", dtype=dtype, requires_grad=True)
    tiles = torch.rand(4, 4, device="cuda", generator=gen) < 0.25
    for weight_mask in (torch.rand(w.shape, device="cuda", generator=gen) < 0.1,
                        tiles.repeat_interleave(16, 0).repeat_interleave(16, 1)[:, :, None, None]
                        .expand(w.shape)):
        pyprune.masked_conv2d(x, w, None, 1, 1, weight_mask=weight_mask).sum().backward()


def main() -> None:
    for backend in ("cuda", "triton"):
        with pyprune.use_backend(backend):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                for run in (_kwta, _sap_noise, _cas, _masked_conv):
                    run(dtype)
    torch.cuda.synchronize()
    print("smoke: every kernel ran")


if __name__ == "__main__":
    main()
