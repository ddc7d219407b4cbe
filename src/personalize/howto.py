"""HOW-TO-USE.txt, the note a run writes beside its files: per file, where it goes (A1111 / Forge, ComfyUI,
diffusers) and exactly what to type in prompts there.

Each tool names a concept its own way: diffusers and `personalize generate` by the token the run trained
(`<concept>`), A1111 / Forge by the embedding's file name (`my-cat-emb`), ComfyUI by `embedding:my-cat-emb`; a LoRA
is switched on by `<lora:STEM:1>` in an A1111 prompt and by a LoraLoader node in ComfyUI. The note is made from the
files as written (their names, the token in each diffusers embedding's metadata), so it says what the folder holds.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from .export import A1111_SUFFIX, EMBEDDINGS_FILE, SDXL_KEYS, atomic_write
from .lora import KOHYA_SUFFIX, LORA_FILE

HOWTO_FILE = "HOW-TO-USE.txt"
RUN_FOLDER = "RUN_FOLDER"  # how the note spells this folder's path in code: it may have been moved since


def write_howto(run: Path, files: list[Path], subjects: list[str], parts: dict[str, str] | None = None) -> Path:
    """Write RUN/HOW-TO-USE.txt about `files` (the run's artefacts, in `run` or below it).

    `subjects`: how a diffusers prompt names each concept the run learned (the method's `prompt_subject`:
    "<concept>", "sks dog", "<concept> face"); `parts`: a line added to the files of a subfolder (its name -> line).
    """
    run = Path(run)
    text = howto_text(run, [Path(f) for f in files], subjects, parts or {})
    return atomic_write(run / HOWTO_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def howto_text(run: Path, files: list[Path], subjects: list[str], parts: dict[str, str]) -> str:
    words = embedding_words(files)
    lora_tag = next((kohya_tag(f) for f in files if is_kohya(f) and f.parent == run), None)
    prompts = {
        "diffusers": " / ".join(subjects),
        "a1111": " / ".join(spell(s, words, "") for s in subjects),
        "comfyui": " / ".join(spell(s, words, "embedding:") for s in subjects),
    }
    lines = [
        f"The files of the run '{run.name}': where each one goes, and what to type in prompts.",
        f"Paths are relative to this folder ({RUN_FOLDER} in the code lines).",
        "",
        "Prompts name what this run learned as:",
        f"  diffusers, personalize generate: {prompts['diffusers']}",
        f"  A1111 / Forge: {prompts['a1111']}" + (f"  (with {lora_tag} anywhere in the prompt)" if lora_tag else ""),
        f"  ComfyUI: {prompts['comfyui']}" + ("  (and the LoRA through a LoraLoader node)" if lora_tag else ""),
        "",
    ]
    for path in files:
        folder = path.parent.relative_to(run).as_posix()
        usage = file_usage(path, folder, prompts, with_embedding=bool(words),
                           with_lora=path.parent / LORA_FILE in files)
        if folder in parts:
            usage.append(parts[folder])
        lines += [path.relative_to(run).as_posix()] + [f"  {line}" for line in usage] + [""]
    return "\n".join(lines)


def file_usage(path: Path, folder: str, prompts: dict[str, str], with_embedding: bool, with_lora: bool) -> list[str]:
    """What to do with one file, one line per tool that reads it (`with_embedding`: the run's LoRA goes with an
    embedding; `with_lora`: a LoRA lies beside this file, and `personalize generate` loads the two together)."""
    here = RUN_FOLDER if folder == "." else f"{RUN_FOLDER}/{folder}"
    if path.name == EMBEDDINGS_FILE:
        return diffusers_embedding_usage(path, here, with_lora)
    if is_a1111_embedding(path):
        name = path.stem
        usage = [f"A1111 / Forge: copy into embeddings/, then write {name} in prompts (the file's name is the word)",
                 f"ComfyUI: copy into models/embeddings/, then write embedding:{name} in prompts"]
        if path.suffix == ".pt":  # diffusers reads A1111's .pt on its own; the SDXL file needs one load per encoder
            usage.append(f'diffusers: pipe.load_textual_inversion("{here}/{path.name}"), then write {name}')
        return usage
    if path.name == LORA_FILE or is_kohya(path):
        return lora_usage(path, here, prompts, with_embedding)
    return ["for personalize itself: no other tool needs it to draw"]


def diffusers_embedding_usage(path: Path, here: str, with_lora: bool) -> list[str]:
    token, sdxl = embedding_facts(path)
    if sdxl:
        diffusers = (f"diffusers (SDXL): load its clip_l into pipe.text_encoder and its clip_g into pipe.text_encoder_2, "
                     f"both under {token} (the README's 'Using the files elsewhere' shows the calls), then write {token}")
    else:
        diffusers = f'diffusers: pipe.load_textual_inversion("{here}"), then write {token} in prompts'
    both = " (loads the LoRA beside it too)" if with_lora else ""
    return [diffusers, f"personalize generate --concept {here}{both}, then write {token}"]


def lora_usage(path: Path, here: str, prompts: dict[str, str], with_embedding: bool) -> list[str]:
    def also(text: str) -> str:  # a LoRA trained with an embedding (TI+LoRA, SingleInsert) draws only with it
        return f" ({text})" if with_embedding else ""

    if path.name == LORA_FILE:
        return [f'diffusers: pipe.load_lora_weights("{here}", weight_name="{LORA_FILE}")'
                f"{also('and the embedding above')}, then write {prompts['diffusers']}",
                f"personalize generate --concept {here}{also('loads the embedding too')}, then write {prompts['diffusers']}"]
    return [f"A1111 / Forge: copy into models/Lora/{also('and the embedding above into embeddings/')}, "
            f"then add {kohya_tag(path)} to the prompt and write {prompts['a1111']}",
            f"ComfyUI: copy into models/loras/{also('and the embedding above into models/embeddings/')}, "
            f"load it with a LoraLoader node, then write {prompts['comfyui']}"]


def is_a1111_embedding(path: Path) -> bool:
    return path.stem.endswith(A1111_SUFFIX) and path.suffix in (".pt", ".safetensors")


def is_kohya(path: Path) -> bool:
    return path.name.endswith(KOHYA_SUFFIX)


def kohya_tag(path: Path) -> str:
    """What an A1111 prompt writes to switch the LoRA on: its file name without `.safetensors`."""
    return f"<lora:{path.name.removesuffix('.safetensors')}:1>"


def embedding_facts(path: Path) -> tuple[str, bool]:
    """(the token a diffusers embedding file was trained as, whether it is SDXL's clip_l/clip_g file)."""
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("token", "the token"), set(SDXL_KEYS) <= set(f.keys())


def embedding_words(files: list[Path]) -> dict[str, str]:
    """token -> the A1111 name of the same embedding (the A1111 file beside that token's diffusers file)."""
    words = {}
    for path in files:
        if is_a1111_embedding(path) and (path.parent / EMBEDDINGS_FILE).is_file():
            words[embedding_facts(path.parent / EMBEDDINGS_FILE)[0]] = path.stem
    return words


def spell(subject: str, words: dict[str, str], prefix: str) -> str:
    """A diffusers prompt's words as another tool spells them: each embedding's token becomes its file name."""
    for token in sorted(words, key=len, reverse=True):  # "<cat-toy>" before "<cat>"
        subject = subject.replace(token, prefix + words[token])
    return subject
