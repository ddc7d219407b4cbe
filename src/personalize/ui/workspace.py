"""The UI's workspace: the one folder whose files it reads and writes, and what the loader will do to each image.

Every path typed into the UI is resolved inside the workspace (symlinks followed) and refused when it leads out of
it, so a browser, even one that is not the user's, cannot make the app read or write elsewhere. Base models are the
one exception, and a bounded one: a built-in name, a hub id (read from the Hugging Face cache), or a folder or file
named when the UI was started (`personalize ui --model-dir PATH`, and the default model). Uploads are
size-limited and decoded by `data.load_rgb`, the loader the CLI trains from, before they are kept.

Layout: `uploads/<concept>/` (images added in the browser, with their `NAME.mask.png`), `runs/<concept>/` (run
folders, with `samples/` and `eval-<protocol>/` inside), `.personalize-ui/` (the job list and its logs).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..data import CAPTION_EXTENSION, IMAGE_EXTENSIONS, MASK_SUFFIX, find_mask, load_image_folder, load_rgb, to_training_tensor
from ..errors import PersonalizeError
from ..export import atomic_write

UPLOADS, RUNS, STATE = "uploads", "runs", ".personalize-ui"
DEFAULT_MAX_UPLOAD_MB = 20  # per file: a few megapixels is plenty for personalisation (the loader downsizes anyway)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+$")  # org/name, as the loader reads a hub id


class Workspace:
    def __init__(self, root: str | Path, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, model_dirs: tuple[str, ...] = ()):
        self.root = Path(root).expanduser().resolve()
        self.max_upload_bytes = int(max_upload_mb * 1024 * 1024)
        self.root.mkdir(parents=True, exist_ok=True)
        # Model folders or files outside the workspace the page may name: the ones given when the UI was started.
        self.model_dirs = tuple(Path(d).expanduser().resolve() for d in model_dirs)

    # -- paths -----------------------------------------------------------------------------------------------

    def resolve(self, typed: str | Path, what: str = "path") -> Path:
        """`typed` (relative to the workspace, or absolute) as an absolute path inside the workspace; refused outside."""
        text = str(typed).strip()
        if not text:
            raise PersonalizeError(f"the {what} is empty")
        path = (self.root / Path(text).expanduser()).resolve()  # an absolute `typed` replaces root; `..` is resolved
        if path != self.root and self.root not in path.parents:
            raise PersonalizeError(f"{what} {text} is outside the workspace {self.root}; the UI reads and writes only "
                                   f"inside it (start `personalize ui --workspace DIR` elsewhere to use other folders)")
        return path

    def check_model(self, spec: str, what: str = "--model", started_with: str | None = None) -> None:
        """Refuse a base model (or a model-config / weights folder) the page may not read: allowed are built-in
        names, hub ids, what the UI was started with (`started_with`, the --model-dir folders) and the workspace."""
        from ..architectures import is_random_model
        from ..tiny import TINY_MODELS

        spec = str(spec).strip()
        if spec in ("toy", *TINY_MODELS, started_with) or is_random_model(spec):
            return
        local = (self.root / Path(spec).expanduser()).resolve()  # how the job, run in the workspace, reads it
        if _HUB_ID.match(spec) and not (self.root / spec).exists():
            return  # a hub id: the loader reads it from the Hugging Face cache (or the hub)
        if any(local == d or d in local.parents for d in self.model_dirs):
            return
        try:
            self.resolve(spec, what)
        except PersonalizeError:
            allowed = ", ".join(map(str, self.model_dirs)) or "none given"
            raise PersonalizeError(f"{what} {spec} is outside the workspace {self.root}: the page may use a built-in "
                                   f"model, a hub id, a path in the workspace, or one under a folder given as "
                                   f"`personalize ui --model-dir PATH` ({allowed})") from None

    def check_dataset(self, typed: str) -> Path:
        """A --dataset file in the workspace whose subsets' folders are in the workspace too."""
        from ..data import read_dataset

        path = self.resolve(typed, "--dataset")
        for subset in read_dataset(path):
            for folder in (subset.images, subset.class_images):
                if folder:
                    self.resolve(folder, f"--dataset {typed}: subset folder")
        return path

    def relative(self, path: str | Path) -> str:
        """How commands name `path`: relative to the workspace, which is where the UI runs them."""
        path = Path(path)
        try:
            return str(path.resolve().relative_to(self.root)) or "."
        except ValueError:
            return str(path)

    def uploads_dir(self, concept: str) -> Path:
        return self.root / UPLOADS / safe_name(concept)

    def run_dir(self, concept: str) -> Path:
        return self.root / RUNS / safe_name(concept)

    @property
    def state_dir(self) -> Path:
        return self.root / STATE

    def runs(self) -> list[Path]:
        """Run folders of the workspace (those holding run.json or config.yaml), newest first."""
        found = [p.parent for pattern in ("*/run.json", "*/*/run.json") for p in self.root.glob(pattern)
                 if STATE not in p.parts]
        return sorted(set(found), key=lambda p: p.stat().st_mtime, reverse=True)

    def save_caption(self, image: str | Path, text: str) -> Path:
        """Write the caption file the loader reads beside `image` (NAME.txt), or remove it when `text` is empty;
        only for an image inside the workspace. Returns the caption file's path."""
        image = self.resolve(image, "image")
        if not image.is_file():
            raise PersonalizeError(f"{self.relative(image)}: no such image")
        caption = image.with_suffix(CAPTION_EXTENSION)
        text = text.strip()
        if text:
            atomic_write(caption, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))
        else:
            caption.unlink(missing_ok=True)
        return caption

    # -- uploads ---------------------------------------------------------------------------------------------

    def save_upload(self, concept: str, filename: str, data: bytes) -> Path:
        """Keep one uploaded file in uploads/<concept>/ after the CLI's loader has read it; PersonalizeError names
        what is wrong otherwise (too big, not an image, undecodable) and nothing is kept."""
        name = safe_name(Path(filename).name)
        suffix = Path(name).suffix.lower()
        if suffix not in IMAGE_EXTENSIONS:
            raise PersonalizeError(f"{filename}: not an image file (accepted: {' '.join(sorted(IMAGE_EXTENSIONS))})")
        if len(data) > self.max_upload_bytes:
            raise PersonalizeError(f"{filename}: {len(data) / 2**20:.1f} MB is over the upload limit of "
                                   f"{self.max_upload_bytes / 2**20:.0f} MB (personalize ui --max-upload-mb)")
        target = self.uploads_dir(concept) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        # Checked under a hidden name (the loader skips dot-files), so a half-checked file is never trained on.
        checking = atomic_write(target.with_name(f".check-{name}"), lambda tmp: tmp.write_bytes(data))
        try:
            load_rgb(checking)  # the CLI's loader: a file it cannot train from is not kept
        except PersonalizeError as exc:
            checking.unlink(missing_ok=True)
            raise PersonalizeError(str(exc).replace(str(checking), filename)) from None
        checking.replace(target)
        return target


def safe_name(name: str) -> str:
    """A file or folder name with only letters, digits, '.', '_' and '-' (no separators, no leading dot)."""
    cleaned = _SAFE_NAME.sub("-", name).strip("-.") or "concept"
    return cleaned[:100]


# -- what the loader will do ---------------------------------------------------------------------------------


@dataclass
class FileReport:
    """One file of an image folder as the loader sees it."""

    path: Path
    status: str  # "ok", "warning" (trains, but look), "skipped" (not read), "bad" (stops the run)
    notes: list[str] = field(default_factory=list)
    preview: Image.Image | None = None  # the square the model trains on (None for skipped and bad files)
    has_mask: bool = False


_EXIF_ORIENTATION = 0x0112
_MODE_NOTES = {
    "RGBA": "transparency composited on white", "LA": "grayscale with transparency: composited on white, made RGB",
    "PA": "palette with transparency: composited on white", "P": "palette image: converted to RGB",
    "L": "grayscale: converted to RGB", "1": "black-and-white: converted to RGB", "CMYK": "CMYK: converted to RGB",
    "I;16": "16-bit: scaled to 8 bit", "I;16B": "16-bit: scaled to 8 bit", "I;16L": "16-bit: scaled to 8 bit",
    "I": "32-bit integer: scaled to 8 bit", "F": "floating point: scaled to 8 bit",
}


def _file_facts(path: Path) -> tuple[tuple[int, int], str, int]:
    """(stored size, mode, EXIF orientation) from the header, before the loader turns the image upright."""
    with Image.open(path) as image:
        return image.size, image.mode, int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)


def describe_image(path: Path, resolution: int | None, needs_mask: bool = False) -> FileReport:
    """What `load_image_folder` will do to one image at `resolution` (None: the model's size is not known yet)."""
    try:
        image = load_rgb(path)
        stored, mode, orientation = _file_facts(path)
    except PersonalizeError as exc:
        return FileReport(path, "bad", [str(exc).replace(f"{path}: ", "")])
    notes, status = [f"{image.width}×{image.height}"], "ok"
    if orientation != 1:
        notes.append(f"EXIF orientation {orientation}: turned upright ({stored[0]}×{stored[1]} as stored)")
    if mode in _MODE_NOTES or (mode == "RGB" and image.info.get("transparency") is not None):
        notes.append(_MODE_NOTES.get(mode, "transparent colour composited on white"))
    if resolution:
        side = min(image.size)
        if image.width != image.height:
            lost = abs(image.width - image.height) * resolution / side
            edges = "left and right" if image.width > image.height else "top and bottom"
            notes.append(f"centre-cropped to a square: about {lost / 2:.0f} px cut on the {edges} at {resolution} px")
        if side < resolution:
            status = "warning"
            notes.append(f"smaller than the training size {resolution} px: upscaled, will look soft")
        elif side > resolution:
            notes.append(f"resized to {resolution}×{resolution}")
        elif image.width == image.height:
            notes.append(f"used as it is ({resolution} px is the training size)")
        preview = _tensor_to_image(to_training_tensor(image, resolution))
    else:
        preview = image.copy()
        preview.thumbnail((256, 256))
    caption = path.with_suffix(CAPTION_EXTENSION)
    if caption.is_file():
        notes.append(f"caption: {caption.read_text(encoding='utf-8-sig', errors='replace').strip()[:80]!r}")
    try:
        mask = find_mask(path)
        has_mask = True
        notes.append(f"mask: {mask.name}")
    except PersonalizeError:
        has_mask = False
        if needs_mask:
            status = "warning" if status == "ok" else status
            notes.append(f"no mask yet: draw one in step 2 (saved as {path.stem}{MASK_SUFFIX}.png)")
    return FileReport(path, status, notes, preview, has_mask)


def _tensor_to_image(pixels) -> Image.Image:
    array = ((pixels.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype("uint8")
    return Image.fromarray(array)


def inspect_folder(folder: Path, resolution: int | None, needs_mask: bool = False) -> list[FileReport]:
    """Every file of an image folder, named, with what the loader does to it (or why it skips or refuses it)."""
    if not folder.is_dir():
        raise PersonalizeError(f"{folder} is not a folder")
    reports = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.name.startswith(".") or path.suffix.lower() == CAPTION_EXTENSION:
            continue
        if path.is_dir():
            reports.append(FileReport(path, "skipped", ["a subfolder: not read"]))
        elif path.suffix.lower() not in IMAGE_EXTENSIONS:
            reports.append(FileReport(path, "skipped", [f"not an image file (accepted: {' '.join(sorted(IMAGE_EXTENSIONS))})"]))
        elif Path(path.stem).suffix.lower() == MASK_SUFFIX:
            continue  # a mask: shown with its image
        else:
            reports.append(describe_image(path, resolution, needs_mask))
    return reports


def loader_verdict(folder: Path, resolution: int | None, needs_mask: bool) -> str | None:
    """The CLI loader's own error for this folder (None when it would train): the last word before training."""
    try:
        load_image_folder(folder, resolution or 64, masks=needs_mask)
    except PersonalizeError as exc:
        return str(exc)
    return None


def native_resolution(model: str) -> int | None:
    """The training size a model folder declares (UNet sample size × VAE scale), read from its configs without
    loading weights; None when it cannot be known before loading (hub ids, single files, built-in tiny models)."""
    from ..backbone import model_folder

    folder = model_folder(model)
    if folder is None:
        return None
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None
