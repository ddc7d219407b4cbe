"""Methods by name: `--method NAME` picks the class; each class names its config dataclass."""

from .base import Batch, Method
from .batex import Batex, BatexConfig
from .textual_inversion import TextualInversion, TextualInversionConfig

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (TextualInversion, Batex)}

__all__ = ["METHODS", "Batch", "Method", "Batex", "BatexConfig", "TextualInversion", "TextualInversionConfig"]
