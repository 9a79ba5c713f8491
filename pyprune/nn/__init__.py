"""Drop-in nn.Modules over pyprune's ops."""
from .kwta import KWTA

__all__ = ["KWTA"]
