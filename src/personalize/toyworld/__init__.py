"""The toy world: procedural scenes, a small pretrained text-to-image model trained on them, and a judge."""

from pathlib import Path

TOY_MODEL_DIR = Path(__file__).parent / "weights" / "base"
