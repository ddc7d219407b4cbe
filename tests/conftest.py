import logging
import os
import warnings
from pathlib import Path

import pytest

# Keep the user's real cache out of tests (the CLIP tokenizer files are built there once).
os.environ.setdefault("PERSONALIZE_CACHE", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "personalize"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests default to the random tiny model (fast, every code path); tests of the toy model name it.
os.environ["PERSONALIZE_MODEL"] = "tiny"
for _name in ("CLIP", "DINO", "INCEPTION", "LPIPS_BACKBONE"):  # a user's metric networks must not leak into tests
    os.environ.pop(f"PERSONALIZE_{_name}", None)
warnings.filterwarnings("ignore", message=".*torchvision.*")
logging.getLogger("transformers").setLevel(logging.ERROR)

REPO = Path(__file__).resolve().parent.parent
DREAMBENCH = REPO.parent / "shared" / "datasets" / "dreambench"
EXAMPLE_IMAGES = REPO / "examples" / "cat"


@pytest.fixture
def dreambench():
    if not DREAMBENCH.is_dir():
        pytest.skip("../shared/datasets/dreambench is not beside this checkout")
    return DREAMBENCH
