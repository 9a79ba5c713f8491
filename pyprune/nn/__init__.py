"""Drop-in nn.Modules over pyprune's ops."""
from .cas import CAS
from .chip import ChipMask
from .kwta import KWTA
from .masked_conv import ChannelGate, MaskedConv2d
from .noise import GaussianNoise, MagnitudePruned, NoisyWeight
from .sap import SAP

__all__ = ["KWTA", "CAS", "SAP", "GaussianNoise", "NoisyWeight", "MagnitudePruned",
           "MaskedConv2d", "ChannelGate", "ChipMask"]
