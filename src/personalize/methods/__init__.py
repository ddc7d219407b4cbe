"""Methods by name: `--method NAME` picks the class; each class names its config dataclass."""

from .base import Batch, Concept, Method
from .batex import Batex, BatexConfig
from .dis2booth import Dis2Booth, Dis2BoothConfig
from .dreambooth_lora import DreamBoothLora, DreamBoothLoraConfig
from .singleinsert import SingleInsert, SingleInsertConfig
from .textual_inversion import TextualInversion, TextualInversionConfig

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (TextualInversion, Batex, DreamBoothLora, Dis2Booth, SingleInsert)}


def run_subject(settings: dict) -> str:
    """How prompts name a run's concept, from its resolved settings (config.yaml): its method says
    (`Method.prompt_subject`); a bare embedding or LoRA file: its token."""
    method = METHODS.get(settings.get("method") or "")
    return method.prompt_subject(settings) if method else settings.get("token") or "<concept>"

__all__ = [
    "METHODS", "run_subject", "Batch", "Concept", "Method", "Batex", "BatexConfig", "Dis2Booth", "Dis2BoothConfig", "DreamBoothLora",
    "DreamBoothLoraConfig", "SingleInsert", "SingleInsertConfig", "TextualInversion", "TextualInversionConfig",
]
