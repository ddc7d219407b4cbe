"""Artefacts other tools load: diffusers / A1111 / ComfyUI embedding files, BaTex's basis sidecar.

Every file is written atomically (a temporary file in the same folder, fsynced, then renamed over the target),
so a killed run or a full disk never leaves a half-written artefact under the final name, and each file is
read back and compared before the run reports success.

Embedding formats
- `learned_embeds.safetensors` — diffusers: `{token: [n, d]}` for SD 1.x/2.x (`load_textual_inversion` reads
  it; A1111 and ComfyUI also accept a one-tensor safetensors); SDXL: `{"clip_l": [n, 768], "clip_g": [n, 1280]}`,
  the layout A1111 and ComfyUI read and diffusers loads per encoder.
- `<name>.pt` (SD 1.x/2.x) — A1111's classic format `{"string_to_param": {"*": [n, d]}, "name": ...}`, plain
  tensors / strings / ints only, so `torch.load(weights_only=True)` opens it (diffusers does). For SDXL the
  A1111 file is `<name>.safetensors`, a copy of the clip_l/clip_g file. `<name>` is the run's name plus "-emb"
  (`a1111_name`): a run in `runs/my-cat` writes `my-cat-emb.pt`, used as `my-cat-emb` in A1111 and diffusers prompts.

Names other tools see. A1111 and ComfyUI keep every embedding and LoRA in one folder each and call them by file
name, so those files are named after the run (`run_name`: its output folder's name, which is the UI's concept
name), not after the token: every run with the default `<concept>` would otherwise write the same `concept-emb.pt`,
and copying two of them into A1111 would overwrite one with the other. The diffusers files keep fixed names
(`learned_embeds.safetensors`, `pytorch_lora_weights.safetensors`: what diffusers looks for in a folder) and the
token the user trained.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import unicodedata
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .errors import PersonalizeError

EMBEDDINGS_FILE = "learned_embeds.safetensors"
BASIS_FILE = "batex_basis.safetensors"
CONCEPTS_DIR = "concepts"  # a run of several concepts: OUTPUT/concepts/<name>/ holds each one's files
SDXL_KEYS = ("clip_l", "clip_g")


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary path beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        _follow_umask(Path(tmp))  # mkstemp (and safetensors) leave 0600; artefacts are meant to be shared
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise PersonalizeError(f"could not write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _follow_umask(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    _check_round_trip(path, tensors, load_file(str(path)))
    return path


def _check_round_trip(path: Path, expected: dict, loaded: dict) -> None:
    if expected.keys() != loaded.keys() or any(not torch.equal(expected[k], loaded[k]) for k in expected):
        raise PersonalizeError(f"{path} did not read back identical to what was written; is the disk full or failing?")


A1111_SUFFIX = "-emb"


def file_stem(name: str) -> str:
    """`name` (a run's or a concept's, as the user typed it) as a file stem every tool reads back as typed.

    ASCII letters, digits, "_" and "-" only: A1111 splits a stem at its last ".", ComfyUI's `embedding:NAME` ends at
    a space, and a prompt is easier to type without accents ("Mon chat été" gives "Mon-chat-ete"). A name with no
    such letter at all keeps a short hash of itself, so two of them still differ.
    """
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", ascii_name).strip("-_")
    return stem or "run-" + hashlib.sha1(name.encode()).hexdigest()[:8]


def run_name(output_dir: str | Path) -> str:
    """The name a run's files carry where other tools see them: its output folder's name (the UI's concept name,
    `runs/NAME`), made a `file_stem`. Two runs in different folders get different names whatever their token."""
    return file_stem(Path(output_dir).resolve().name)


def a1111_name(name: str) -> str:
    """The A1111 / ComfyUI embedding's name for a run (or a run's concept) called `name`: its file name, and the word
    a prompt writes to use it there.

    A run's name could be an ordinary word ("star"): diffusers refuses a name already in the vocabulary, and A1111
    would replace that word in every prompt. So the name ends in "-emb": CLIP's tokenizer always splits letters from
    "-", so no such name is ever one vocabulary entry, and A1111 only matches it where a prompt spells out the whole
    name.
    """
    return file_stem(name) + A1111_SUFFIX


def save_embeddings(output_dir: Path, token: str, vectors: list[torch.Tensor], *, step: int, model_name: str,
                    name: str | None = None) -> list[Path]:
    """Write the diffusers file and the A1111 file for one concept (`vectors`: one [n, d] per text encoder).

    `name`: what A1111 and ComfyUI call it (`a1111_name`); default the output folder's name (`run_name`).
    """
    output_dir = Path(output_dir)
    meta = {"token": token, "num_vectors": str(vectors[0].shape[0]), "step": str(step), "base_model": model_name}
    name = a1111_name(name or run_name(output_dir))
    if len(vectors) == 2:  # SDXL
        tensors = dict(zip(SDXL_KEYS, vectors))
        return [
            save_safetensors(output_dir / EMBEDDINGS_FILE, tensors, meta),
            save_safetensors(output_dir / f"{name}.safetensors", tensors, meta),
        ]
    diffusers_file = save_safetensors(output_dir / EMBEDDINGS_FILE, {token: vectors[0]}, meta)
    a1111 = {
        "string_to_token": {"*": 265},  # A1111 ignores the id; 265 is what its own trainer writes
        "string_to_param": {"*": vectors[0].detach().clone()},
        "name": name,
        "step": step,
        "sd_checkpoint": None,
        "sd_checkpoint_name": model_name,
    }
    a1111_file = atomic_write(output_dir / f"{name}.pt", lambda tmp: torch.save(a1111, tmp))
    back = torch.load(a1111_file, map_location="cpu", weights_only=True)
    _check_round_trip(a1111_file, {"*": vectors[0]}, back["string_to_param"])
    return [diffusers_file, a1111_file]


def save_basis_sidecar(output_dir: Path, sources, token: str, init_word: str, config) -> Path:
    """BaTex's basis: per text encoder, the basis token ids [n, M] (−1 = padding) and the learned weights w [n, M]."""
    tensors = {}
    for i, source in enumerate(sources):
        tensors[f"encoder_{i}.basis_ids"] = source.basis_ids.cpu()
        tensors[f"encoder_{i}.w"] = source.w.detach().float().cpu()
    meta = {
        "token": token,
        "init_word": init_word,
        "distance": config.distance,
        "basis_size": json.dumps([int((s.basis_ids[0] >= 0).sum()) for s in sources]),
        "subspace_dim": json.dumps(config.subspace_dim),
    }
    return save_safetensors(Path(output_dir) / BASIS_FILE, tensors, meta)


# -- reading ---------------------------------------------------------------------------------------------------


def load_embedding_file(path: str | Path, token: str | None = None) -> tuple[str, list[torch.Tensor]]:
    """Read any supported embedding file: (placeholder, one [n, d] tensor per text encoder).

    Accepts a run's output folder (its learned_embeds.safetensors), a diffusers file `{token: [n, d]}`, an
    SDXL file `{clip_l, clip_g}` (token from metadata, `token`, or the file name), or an A1111 `.pt`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / EMBEDDINGS_FILE
    if not path.is_file():
        raise PersonalizeError(f"concept file {path} does not exist (pass a run's output folder or an embedding file)")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                data = {k: f.get_tensor(k) for k in f.keys()}
        else:
            data, meta = torch.load(path, map_location="cpu", weights_only=True), {}
    except Exception as exc:  # noqa: BLE001 - corrupt files raise many kinds of error
        raise PersonalizeError(f"{path} is not a readable embedding file ({type(exc).__name__}: {exc})") from exc
    if isinstance(data, torch.Tensor):  # a bare tensor, as diffusers' load_textual_inversion accepts
        return token or f"<{path.stem}>", [_as_matrix(data)]
    if not isinstance(data, dict):
        raise PersonalizeError(f"{path} holds a {type(data).__name__}, not an embedding (expected a dict of tensors)")
    default_token = token or meta.get("token") or f"<{path.stem}>"
    if "string_to_param" in data:  # A1111
        return token or meta.get("token") or f"<{data.get('name', path.stem)}>", [_as_matrix(data["string_to_param"]["*"])]
    if set(SDXL_KEYS) <= data.keys():
        return default_token, [_as_matrix(data[k]) for k in SDXL_KEYS]
    if len(data) == 1:
        (key, value), = data.items()
        return token or key, [_as_matrix(value)]
    if token in data:  # several tensors, one named by the token (e.g. the official BaTex code's learned_embeds.bin)
        return token, [_as_matrix(data[token])]
    raise PersonalizeError(f"{path} holds {sorted(data)[:5]}, not an embedding (expected one tensor, clip_l/clip_g, "
                           "string_to_param, or the tensor of the token you pass)")


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    return (t.unsqueeze(0) if t.dim() == 1 else t).float()
