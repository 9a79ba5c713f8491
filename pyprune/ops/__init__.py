"""Public functional ops; each module registers its fakes and autograd on import."""
from .cas import cas
from .kwta import kwta
from .masked_conv import masked_conv2d
from .noise import gaussian_noise, magnitude_mask
from .sap import sap

__all__ = ["kwta", "cas", "sap", "gaussian_noise", "magnitude_mask", "masked_conv2d"]
