"""pyprune: fused kernels for k-WTA, stochastic activation pruning, CAS and masked convolution.

Public ops are plain functions (``pyprune.kwta``), modules live in ``pyprune.nn``, and every op
runs on one of the backends listed by ``pyprune.backends(device)``.
"""
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import torch  # noqa: F401  (loads libtorch, which _C links against)


class _SourceTreeTritonKernels(importlib.abc.MetaPathFinder):
    """Maps ``pyprune.triton_kernels`` to the top-level ``triton_kernels/`` directory of a source
    checkout, as the installed package's ``package_dir`` does. An in-place build
    (``setup.py build_ext --inplace``, used by ``make gpu``) imports pyprune from the checkout,
    where that directory is not inside ``pyprune/``; installed and editable packages have their
    own mapping and never reach this finder (it is appended last and only when nothing else
    finds the subpackage)."""

    name = __name__ + ".triton_kernels"

    def __init__(self, directory: Path):
        self.directory = directory

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        return importlib.util.spec_from_file_location(
            fullname, self.directory / "__init__.py",
            submodule_search_locations=[str(self.directory)])


def _map_source_tree_triton_kernels() -> None:
    checkout = Path(__file__).resolve().parent.parent
    directory = checkout / "triton_kernels"
    if not (checkout / "setup.py").is_file() or not (directory / "__init__.py").is_file():
        return  # an installed package: pyprune/triton_kernels/ is part of it
    if importlib.machinery.PathFinder.find_spec("triton_kernels", __path__) is not None:
        return
    if any(isinstance(f, _SourceTreeTritonKernels) for f in sys.meta_path):
        return
    sys.meta_path.append(_SourceTreeTritonKernels(directory))


_map_source_tree_triton_kernels()


def _check_torch_version(built: str, running: str) -> None:
    """Raises ImportError when torch ``running`` is another release (major.minor) than the torch
    ``built`` that pyprune._C was compiled against: _C links against that torch's C++ symbols,
    which change between releases (loading it would fail with an undefined symbol, or worse)."""
    def release(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in version.split("+")[0].split(".")[:2])

    if release(built) != release(running):
        major_minor = ".".join(map(str, release(built)))
        raise ImportError(
            f"pyprune was built against torch {built}, but torch {running} is installed; its "
            f"compiled kernels (pyprune._C) load only with torch {major_minor}.x. Install "
            f"torch=={major_minor}.* or rebuild pyprune against the installed torch (pip install "
            "--no-build-isolation --force-reinstall --no-deps <pyprune sdist or checkout>)")


try:
    # Written by setup.py into built packages (wheels, pip install); in-place builds have none.
    from ._build_info import TORCH_VERSION as _BUILD_TORCH_VERSION
except ImportError:
    pass
else:
    _check_torch_version(_BUILD_TORCH_VERSION, str(torch.__version__))

from . import _C  # noqa: F401  (registers the torch.ops.pyprune operators; raises its real error)
from . import nn, reference
from ._backend import backend_status, backends, cpu_isa, use_backend
from .analysis import channel_activation_frequency
from .losses import cas_loss, pc_loss
from . import chipnet
from .chipnet import budget_loss, crispness_loss
from .compact import compact, count, mask_convolutions
from .convert import cas_logits, convert, set_cas_label
from .ops import cas, kwta, masked_conv2d
from .ops import gaussian_noise, magnitude_mask, sap
from ._seeding import seed_per_rank

__version__ = "0.1.0"

__all__ = [
    "kwta", "cas", "masked_conv2d", "sap", "gaussian_noise", "magnitude_mask",
    "cas_loss", "pc_loss", "channel_activation_frequency",
    "chipnet", "crispness_loss", "budget_loss", "compact", "count", "mask_convolutions",
    "convert", "set_cas_label", "cas_logits",
    "backends", "backend_status", "cpu_isa", "use_backend", "nn", "reference",
    "seed_per_rank",
]
