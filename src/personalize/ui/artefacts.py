"""What each file of a run folder is for and where it goes, one line each (the README's "Using the files
elsewhere", in the UI's download list)."""

from __future__ import annotations

from pathlib import Path

from ..export import A1111_SUFFIX, BASIS_FILE, EMBEDDINGS_FILE
from ..howto import HOWTO_FILE
from ..lora import LORA_FILE


def where_it_goes(name: str, token: str | None = None) -> str:
    """One line for a run folder's file `name` (token: the run's placeholder, for the prompts' wording)."""
    stem = name.split(".")[0]
    if name == EMBEDDINGS_FILE:
        return (f"diffusers embedding: pipe.load_textual_inversion(\"RUN_FOLDER\"), then write {token or 'the token'} "
                "in prompts (SDXL: one load per text encoder, see the README)")
    if stem.endswith(A1111_SUFFIX) and name.endswith((".pt", ".safetensors")):
        return f"A1111 / ComfyUI embedding: copy into embeddings/ and write {stem} in prompts"
    if name == LORA_FILE:
        return f"diffusers LoRA: pipe.load_lora_weights(\"RUN_FOLDER\", weight_name=\"{LORA_FILE}\")"
    if name.endswith(".kohya.safetensors"):
        return f"A1111 / ComfyUI LoRA: copy into models/Lora/ and add <lora:{name.removesuffix('.safetensors')}:1> to prompts"
    if name == BASIS_FILE:
        return "BaTex's basis words and learned weights (for study; generation needs only the embedding)"
    if name == "image_encoder.safetensors":
        return "SingleInsert's image encoder (turns an image into the concept's vector)"
    if name in ("anchor", "delta"):
        return f"Dis²Booth's {name} LoRA alone: pipe.set_adapters([\"anchor\", \"delta\"], [α, β]) recombines them"
    if name == HOWTO_FILE:
        return "what each file is for, where it goes in A1111 / Forge, ComfyUI and diffusers, and what to type in prompts"
    if name == "config.yaml":
        return "every setting of the run: personalize train --config config.yaml repeats it"
    return ""


def artefacts(run: Path, names: list[str], token: str | None = None) -> list[tuple[Path, str]]:
    """(file, where it goes) of a finished run's artefacts (run.json's list) and its settings."""
    files = [run / n for n in names] + [run / "config.yaml"]
    return [(f, where_it_goes(f.name, token)) for f in files if f.exists()]
