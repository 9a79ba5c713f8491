"""Public functional ops; each module registers its fakes and autograd on import."""
from .kwta import kwta

__all__ = ["kwta"]
