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
# Under pytest-xdist (pyproject's addopts: one worker per core) each worker gets one torch thread: two workers of two
# threads each on two cores would fight over them (OpenMP spins while it waits).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", message=".*torchvision.*")
logging.getLogger("transformers").setLevel(logging.ERROR)

REPO = Path(__file__).resolve().parent.parent
# Five DreamBench "cat" photos (CC-BY-4.0, 128 px) ship in the repository: tests of real photos use them.
EXAMPLE_IMAGES = REPO / "examples" / "cat"
# The DreamBooth dataset's other subjects are not in the repository; the few tests that want them say so loudly.
DREAMBENCH = REPO.parent / "shared" / "datasets" / "dreambench"


def missing_requirement(message: str):
    """A test needs something the README's set-up does not install (a browser, the DreamBench photos beside the
    checkout). For a user it skips, saying how to enable it; in CI (`CI=true`, as `.ci/run` runs) it fails, so a
    CI machine without it never passes untested."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message} (CI=true: a missing requirement fails here rather than skipping)", pytrace=False)
    pytest.skip(message)


def dreambench_folder(path: Path = DREAMBENCH) -> Path:
    """The DreamBench photos beside this checkout. Missing: skipped for a user with what to do, failed in CI."""
    if not path.is_dir():
        missing_requirement(f"{path} is missing: this test needs the DreamBooth dataset's photos (google/dreambooth, "
                            f"dataset/) there, e.g. `git clone https://github.com/google/dreambooth` and link its "
                            f"dataset/ as {path}; tests that can do with one subject use the in-repository "
                            f"{EXAMPLE_IMAGES}")
    return path


@pytest.fixture
def dreambench():
    return dreambench_folder()


def load_benchmark_script(name: str):
    """benchmarks/NAME.py as a module (the benchmark scripts are files, not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
