"""One small call of every CUDA and Triton kernel, forward and backward, for compute-sanitizer
(`python -m tests.smoke`, run by `make gpu`)."""
import torch

import pyprune


def main() -> None:
    shapes = [((4, 8, 5, 5), "channel"), ((3, 70001), "sample"), ((2, 16, 32, 32), "sample")]
    for backend in ("cuda", "triton"):
        with pyprune.use_backend(backend):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                for shape, mode in shapes:
                    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
                    pyprune.kwta(x, 0.1, mode=mode).sum().backward()
    torch.cuda.synchronize()
    print("smoke: every kernel ran")


if __name__ == "__main__":
    main()
