from .duca import DuCa
from .toca import ToCa

__all__ = ["DuCa", "ToCa"]
