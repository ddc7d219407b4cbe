"""Steps 1 and 2 of the page: the images (uploaded or a workspace folder, each shown as the loader will use it)
and their masks (drawn in the browser, or made by `personalize mask`)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from nicegui import ui
from PIL import Image

from ..errors import PersonalizeError
from ..data import CAPTION_EXTENSION
from .masks import MaskCanvas, mask_path
from .workspace import inspect_folder, loader_verdict, safe_name

STATUS_COLOURS = {"ok": "positive", "warning": "warning", "bad": "negative", "skipped": "grey"}


def data_url(image: Image.Image, min_side: int = 0) -> str:
    """A PNG data URL; images smaller than `min_side` are enlarged by a whole factor, nearest-neighbour, so
    64-px toy images are seen as their pixels rather than as a blur."""
    factor = max(1, -(-min_side // max(1, min(image.size)))) if min_side else 1
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class ImageSteps:
    """The page's steps 1 and 2 (a part of `app.Page`, whose state and helpers it uses)."""

    # -- 1 images --------------------------------------------------------------------------------------------

    def build_images(self) -> None:
        ui.markdown("Add **3–20 images** of your concept (SingleInsert: one is enough). Each one is read by the same "
                    "loader `personalize train` uses, so what you see here is what will train.")
        with ui.row().classes("w-full gap-6 items-start"):
            with ui.card().classes("w-96"):
                ui.label("Upload images").classes("font-bold")
                ui.upload(multiple=True, auto_upload=True, max_file_size=self.ws.max_upload_bytes,
                          on_multi_upload=self.on_upload, on_rejected=self.on_rejected,
                          label=f"drop or pick files (≤ {self.ws.max_upload_bytes // 2**20} MB each)").classes("w-full") \
                    .props('accept=".png,.jpg,.jpeg,.webp,.bmp,.tif,.tiff"')
            with ui.card().classes("w-96"):
                ui.label("…or use a folder in the workspace").classes("font-bold")
                folder = ui.input("Folder", placeholder="e.g. examples/blue-striped-star").props("outlined dense").classes("w-full")
                ui.button("Use this folder", on_click=lambda: self.use_folder(folder.value)).props("outline")
        self.images_view()
        self.next_button("settings", "Next: method & settings")

    async def on_upload(self, e) -> None:
        saved = []
        for file in e.files:
            try:
                saved.append(self.ws.save_upload(self.concept, file.name, await file.read()))
            except PersonalizeError as exc:
                self.rejected.append(str(exc))
        self.images = self.ws.uploads_dir(self.concept)
        e.sender.reset()
        if saved:
            ui.notify(f"kept {len(saved)} image(s) in {self.rel(self.images)}", type="positive")
        self.after_images_changed()

    def on_rejected(self, _e) -> None:
        self.rejected.append(f"a file over {self.ws.max_upload_bytes // 2**20} MB or not an image was refused by the browser")
        self.images_view.refresh()

    def use_folder(self, typed: str) -> None:
        try:
            folder = self.ws.resolve(typed, "image folder")
            if not folder.is_dir():
                raise PersonalizeError(f"{typed}: no such folder in the workspace")
        except PersonalizeError as exc:
            ui.notify(str(exc), type="negative", multi_line=True)
            return
        self.images = folder
        if self.concept == "my-concept":  # a folder of star photos is a concept called star, until said otherwise
            self.concept_input.set_value(safe_name(folder.name))
        self.after_images_changed()

    def after_images_changed(self) -> None:
        self.refresh_where()
        self.images_view.refresh()
        self.mask_choices()

    @ui.refreshable_method
    def images_view(self) -> None:
        for message in self.rejected:
            ui.label(f"not kept: {message}").classes("text-negative text-sm")
        if not self.images.is_dir():
            ui.label("No images yet.").classes("text-gray-500")
            return
        size = self.resolution
        reports = inspect_folder(self.images, size, self.needs_masks)
        verdict = loader_verdict(self.images, size, self.needs_masks)
        good = sum(r.status in ("ok", "warning") for r in reports)
        where = f"{self.rel(self.images)}, seen at {size} px" if size else self.rel(self.images)
        if verdict:
            ui.label(f"Training would stop: {verdict}").classes("text-negative whitespace-pre-line")
        else:
            ui.label(f"✓ {good} image(s) ready to train ({where}). Below: the square each one becomes.") \
                .classes("text-positive").props("id=images-ready")
        with ui.row().classes("gap-3"):
            for report in reports:
                self.image_card(report)

    def image_card(self, report) -> None:
        with ui.card().classes("w-48 p-2 gap-1"):
            if report.preview is not None:
                ui.image(data_url(report.preview, 176)).classes("w-44 h-44 pixelated").props("no-transition no-spinner")
            ui.label(report.path.name).classes("font-mono text-sm break-all")
            ui.badge(report.status, color=STATUS_COLOURS[report.status])
            for note in report.notes:
                if not note.startswith("caption: "):  # the caption has its own field below
                    ui.label(note).classes("help")
            if report.status in ("ok", "warning"):
                self.caption_field(report.path)
            if report.path.parent == self.ws.uploads_dir(self.concept):
                ui.button("remove", on_click=lambda p=report.path: self.remove_upload(p)).props("flat dense size=sm")

    def caption_field(self, image: Path) -> None:
        """NAME.txt beside the image, edited in place: DreamBooth-LoRA and Dis²Booth train on it (the others with
        `caption: files` in a --dataset file); saved when the field loses focus, removed when emptied."""
        caption = image.with_suffix(CAPTION_EXTENSION)
        text = caption.read_text(encoding="utf-8-sig", errors="replace").strip() if caption.is_file() else ""
        field = ui.textarea("Caption", value=text, placeholder=f"{caption.name}: none").props("outlined dense autogrow") \
            .classes("w-full text-xs").props(f"data-caption={image.name}")
        field.on("blur", lambda _e, image=image, field=field: self.save_caption(image, field.value))

    def save_caption(self, image: Path, text: str) -> None:
        try:
            written = self.ws.save_caption(image, text or "")
        except PersonalizeError as exc:
            ui.notify(str(exc), type="negative")
            return
        ui.notify(f"saved {self.rel(written)}" if written.is_file() else f"removed {self.rel(written)}", type="positive")

    def remove_upload(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        mask_path(path).unlink(missing_ok=True)
        path.with_suffix(CAPTION_EXTENSION).unlink(missing_ok=True)
        self.after_images_changed()

    # -- 2 mask ----------------------------------------------------------------------------------------------

    def build_mask(self) -> None:
        ui.markdown("SingleInsert (and `--masked-loss`) learn only the **masked part** of each image. Paint the concept; "
                    "the mask is saved as `NAME.mask.png` beside the image — the file `personalize train` reads. "
                    "Other methods can skip this step.")
        with ui.row().classes("w-full gap-6 items-start"):
            with ui.column().classes("gap-2"):
                self.mask_select = ui.select([], label="Image", on_change=self.on_mask_image).props("outlined dense").classes("w-64")
                self.brush_mode = ui.toggle({True: "paint concept", False: "erase"}, value=True).props("id=brush-mode")
                ui.label("brush radius (image pixels)").classes("help")
                # (margin above: the always-on value bubble rises above the slider, over the toggle without it)
                self.brush = ui.slider(min=1, max=40, value=4).props("label-always id=brush").classes("w-64 mt-6")
                with ui.row():
                    ui.button("Guess from flat background", on_click=self.mask_guess).props("outline") \
                        .tooltip("the background colour touching the border is not the concept: right for toy scenes and plain backdrops")
                    ui.button("Clear", on_click=self.mask_clear).props("outline")
                ui.button("Save mask", icon="save", on_click=self.mask_save).props("id=save-mask")
                self.mask_info = ui.label("").classes("help").props("id=mask-info")
            self.mask_image = ui.interactive_image(events=["mousedown", "mousemove", "mouseup"], on_mouse=self.on_mask_mouse) \
                .classes("pixelated border").style("width: 384px; height: 384px").props("id=mask-canvas")
        with ui.expansion("Make masks automatically (GroundingDINO + SAM weights)", icon="auto_fix_high").classes("w-full"):
            with ui.row().classes("items-end gap-3"):
                word = ui.input("Class word", placeholder="e.g. face").props("outlined dense")
                dino = ui.input("--grounding-dino", placeholder="folder or cached hub id").props("outlined dense")
                sam = ui.input("--sam", placeholder="folder or cached hub id").props("outlined dense")
                ui.button("Run personalize mask", on_click=lambda: self.mask_job(word.value, dino.value, sam.value))
        self.mask_choices()

    def mask_choices(self) -> None:
        if not hasattr(self, "mask_select"):
            return
        reports = inspect_folder(self.images, None) if self.images.is_dir() else []
        names = {str(r.path): f"{r.path.name} {'✓ mask' if r.has_mask else ''}" for r in reports if r.status != "skipped"}
        self.mask_select.set_options(names, value=next(iter(names), None))

    def on_mask_image(self, e) -> None:
        if not e.value:
            return
        try:
            self.canvas = MaskCanvas(e.value)
        except PersonalizeError as exc:
            ui.notify(str(exc), type="negative")
            return
        self.show_mask()

    def show_mask(self) -> None:
        canvas = self.canvas
        self.mask_image.set_source(data_url(canvas.composite()))
        self.mask_info.set_text(f"{canvas.coverage:.0%} of the image is marked as the concept")

    def on_mask_mouse(self, e) -> None:
        if self.canvas is None:
            return
        if e.type == "mouseup" or (e.type == "mousemove" and not e.buttons & 1):
            self.canvas.end_stroke()
            return
        self.canvas.paint(e.image_x, e.image_y, float(self.brush.value), bool(self.brush_mode.value),
                          continue_stroke=e.type == "mousemove")
        self.show_mask()

    def mask_guess(self) -> None:
        if self.canvas:
            self.canvas.guess_flat_background()
            self.show_mask()

    def mask_clear(self) -> None:
        if self.canvas:
            self.canvas.clear()
            self.show_mask()

    def mask_save(self) -> None:
        if self.canvas is None:
            return
        if not 0 < self.canvas.coverage < 1:  # the trainer refuses both: nothing to learn, or nothing to leave out
            ui.notify("paint the concept first: a mask must cover some of the image, not all of it", type="warning")
            return
        try:
            self.ws.resolve(self.canvas.image_path, "mask")  # masks are written only inside the workspace
            path = self.canvas.save()
        except PersonalizeError as exc:
            ui.notify(str(exc), type="negative")
            return
        ui.notify(f"saved {self.rel(path)}", type="positive")
        self.images_view.refresh()
        current = self.mask_select.value
        self.mask_choices()
        self.mask_select.set_value(current)

    def mask_job(self, word: str, dino: str, sam: str) -> None:
        argv = ["mask", "--images", self.rel(self.images), "--class-word", word or "", "--grounding-dino", dino or "", "--sam", sam or ""]
        self.submit("mask", argv, self.rel(self.images))
