"""Real-size Stable Diffusion architectures with random weights: `--model random:sd15`, `random:sd21`, `random:sdxl`.

Beside this file are the configs — and only the configs — of three public diffusers folders:

| name   | architecture of                          | native px | UNet params | text encoder params                    |
|--------|------------------------------------------|----------:|------------:|----------------------------------------|
| `sd15` | runwayml/stable-diffusion-v1-5           |       512 | 859,520,964 | CLIP ViT-L 123,060,480 (768 wide)      |
| `sd21` | stabilityai/stable-diffusion-2-1 (v)     |       768 | 865,910,724 | OpenCLIP ViT-H 340,387,840 (1024, 23 layers) |
| `sdxl` | stabilityai/stable-diffusion-xl-base-1.0 |      1024 | 2,567,463,684 | CLIP ViT-L 123,060,480 + OpenCLIP bigG 694,659,840 (1280) |

(VAE: 83,653,863 in all three.)

`random_model_folder("random:sd15")` turns them, once, into a complete diffusers folder in the cache
($PERSONALIZE_CACHE, else ~/.cache/personalize; the same place as the CLIP tokenizer files): the shipped configs
copied byte for byte, the tokenizers' vocab.json / merges.txt from the shipped CLIP BPE merges (`tiny.py`), and
seeded random weights as safetensors. `backbone` then loads that folder with the very call that loads any local
folder, so nothing after the folder's path differs from a downloaded model. The models draw noise, not pictures:
they are for measuring speed and memory and for checking that every method runs at real size.

The weights are written in fp16 (the loader reads them as fp32, like any fp16 folder), one tensor at a time, so
building needs little memory beyond one tensor (SDXL: 0.8 GiB peak RSS, 38 s on a 2-core CPU; SD 1.5: 31 s). On
disk: sd15 2.0 GiB, sd21 2.5 GiB, sdxl 6.5 GiB. Loading holds the fp32 model in RAM: peak RSS 5.2-6, 6-7 and
14-17.5 GiB (CPU training runs at 64 px; see benchmarks/README.md). The folder is keyed by a fingerprint of the
shipped configs, the seed and the builder's version, so a changed config builds a new folder (old ones stay until
deleted).

Differences from the downloaded folders, none on the loading path: the weights (random, fp16 under the default
file names, no `.fp16` variants), and SD 1.5's safety checker, which is not shipped: its model_index.json names
`"safety_checker": [null, null]` with `requires_safety_checker: false` (as SD 2.1's and many published checkpoints
do), so plain `DiffusionPipeline.from_pretrained(folder)` loads every folder without arguments.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import shutil
import struct
import tempfile
import time
import zlib
from pathlib import Path

import torch

from ..errors import PersonalizeError

log = logging.getLogger(__name__)

PREFIX = "random:"
CONFIG_ROOT = Path(__file__).parent
ARCHITECTURES = {
    "sd15": "runwayml/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
SEED = 0
BUILDER_VERSION = 2  # bump when the files this module writes change for the same configs and seed (2: text encoders
#                      in the published key layout, `text_model.` included)
_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def is_random_model(spec: str) -> bool:
    return str(spec).startswith(PREFIX)


def architecture_name(spec: str) -> str:
    """'sd15' for 'random:sd15'; a clear error for a name that is not shipped."""
    name = str(spec)[len(PREFIX):]
    if name not in ARCHITECTURES:
        choices = ", ".join(PREFIX + n for n in ARCHITECTURES)
        raise PersonalizeError(f"unknown random model {spec!r}; the shipped architectures are {choices}")
    return name


def config_folder(spec: str) -> Path:
    """The shipped configs of `spec` (a diffusers folder without weights): readable without building anything."""
    return CONFIG_ROOT / architecture_name(spec)


def random_model_folder(spec: str, *, seed: int = SEED, dtype: torch.dtype = torch.float16) -> Path:
    """The complete diffusers folder of `spec` ('random:sd15', ...), built into the cache the first time (atomically)."""
    from ..tiny import cache_dir

    configs = config_folder(spec)
    root = cache_dir() / "random-models"
    folder = root / f"{architecture_name(spec)}-{fingerprint(configs, seed, dtype)}"
    if (folder / "model_index.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder.name}-"))
    start = time.perf_counter()
    log.info("building %s once (random weights, the configs of %s) in %s", spec, ARCHITECTURES[architecture_name(spec)],
             folder)
    try:
        build_folder(configs, tmp, seed=seed, dtype=dtype)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first: its folder is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built %s in %.0f s", spec, time.perf_counter() - start)
    return folder


def fingerprint(configs: Path, seed: int, dtype: torch.dtype) -> str:
    digest = hashlib.sha256(f"v{BUILDER_VERSION} seed {seed} {dtype}".encode())
    for path in sorted(p for p in configs.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(configs)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def build_folder(configs: Path, folder: Path, *, seed: int = SEED, dtype: torch.dtype = torch.float16) -> None:
    """Write a loadable diffusers folder into `folder`: every file of `configs`, CLIP vocabulary files for each
    CLIPTokenizer component, and seeded random weights for each torch component that model_index.json names."""
    from ..tiny import copy_clip_vocabulary

    shutil.copytree(configs, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    index = json.loads((configs / "model_index.json").read_text())
    for component, entry in index.items():
        if component.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        if not (configs / component).is_dir():
            continue  # named but not shipped: the shipped folders have none (a test checks)
        library, class_name = entry
        if class_name.startswith("CLIPTokenizer"):
            copy_clip_vocabulary(folder / component)
            continue
        cls = _component_class(library, class_name)
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            _write_random_weights(cls, library, folder / component, seed=seed, dtype=dtype)


def _component_class(library: str, class_name: str):
    module = importlib.import_module(library if library in ("diffusers", "transformers") else f"diffusers.pipelines.{library}")
    return getattr(module, class_name)


def _empty_model(cls, library: str, folder: Path) -> torch.nn.Module:
    """The component's module with every tensor on the meta device: its state-dict keys and shapes, no memory."""
    with torch.device("meta"):
        if library == "diffusers":
            return cls.from_config(cls.load_config(folder))
        return cls(cls.config_class.from_pretrained(folder))


def _write_random_weights(cls, library: str, folder: Path, *, seed: int, dtype: torch.dtype) -> None:
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from transformers.utils import SAFE_WEIGHTS_NAME

    shapes = {k: tuple(v.shape) for k, v in _empty_model(cls, library, folder).state_dict().items()}
    if cls.__name__.startswith("CLIPTextModel"):  # written as the published checkpoints are, seeded by the bare name
        shapes = {published_text_encoder_key(k): shape for k, shape in shapes.items()}
    name = SAFETENSORS_WEIGHTS_NAME if library == "diffusers" else SAFE_WEIGHTS_NAME
    write_safetensors(folder / name, shapes,
                      lambda key: random_tensor(key.removeprefix(TEXT_MODEL), shapes[key], seed).to(dtype), dtype)


TEXT_MODEL = "text_model."


def published_text_encoder_key(key: str) -> str:
    """A CLIP text encoder's weight name as the published checkpoints (SD 1.x/2.x `text_encoder`, SDXL's two) store it:
    `text_model.` before everything but the projection. transformers 5 names its parameters without that level and
    reads both layouts; transformers 4 (our oldest supported version, and the stack kohya's sd-scripts pins) reads
    only this one and silently re-initialises a text encoder saved without it. So every text encoder we write uses it."""
    return key if key.startswith((TEXT_MODEL, "text_projection.")) else TEXT_MODEL + key


def text_encoder_state_for(module: torch.nn.Module, state: dict) -> dict:
    """`state` (either layout) under the names `module` has in the installed transformers."""
    own = module.state_dict().keys()
    return {k if k in own else k.removeprefix(TEXT_MODEL) if k.removeprefix(TEXT_MODEL) in own else TEXT_MODEL + k: v
            for k, v in state.items()}


def save_text_encoder_published(folder: Path) -> None:
    """Rewrite `folder/model.safetensors` (as transformers' save_pretrained wrote it) in the published layout, atomically."""
    from safetensors.torch import load_file, save_file

    file = folder / "model.safetensors"
    state = load_file(str(file))
    tmp = file.with_name(file.name + ".tmp")
    save_file({published_text_encoder_key(k): v for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(file)


def random_tensor(key: str, shape: tuple, seed: int) -> torch.Tensor:
    """PyTorch's own default initialisation, seeded per tensor (by name), so each tensor is reproducible alone.

    Linear and conv weights: U(±1/√fan_in) (nn.Linear's and nn.Conv2d's default); embedding tables: N(0, 0.02)
    (CLIP's initializer_range); norm scales 1; biases 0. Small random weights keep a 0.9-3.5 B-parameter network
    finite in fp16 and bf16, which is all the benchmarks and real-size tests need.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    if len(shape) >= 2:
        if "embedding" in key.split(".")[-2]:
            return torch.empty(shape).normal_(0.0, 0.02, generator=generator)
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        bound = fan_in ** -0.5
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)
    if key.endswith("weight") and len(shape) == 1:
        return torch.ones(shape)
    return torch.zeros(shape)


def write_safetensors(path: Path, shapes: dict[str, tuple], make, dtype: torch.dtype) -> None:
    """A .safetensors file written one tensor at a time (`make(key)` gives each), so that a 2.6 B-parameter UNet
    never has to be in memory whole. Same layout as `safetensors.torch.save_file`: little-endian u64 header size,
    JSON header (space-padded to 8 bytes) with each tensor's dtype, shape and byte range, then the data."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key in sorted(shapes):
        size = itemsize
        for d in shapes[key]:
            size *= d
        header[key] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shapes[key]), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for key in sorted(shapes):
            tensor = make(key).to(dtype).contiguous()
            if tuple(tensor.shape) != tuple(shapes[key]):
                raise ValueError(f"{key}: made {tuple(tensor.shape)}, declared {shapes[key]}")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)  # raw bytes (numpy has no bfloat16)
