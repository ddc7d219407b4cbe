"""`personalize mask`: foreground masks from a class word, with GroundingDINO (box) + SAM (mask) via transformers.

For each image: GroundingDINO finds the highest-scoring box for "<class word>." above `box_threshold`; SAM turns
that box into a mask; the mask is written as `NAME.mask.png` beside the image (white = the concept), where
`personalize train --method singleinsert` looks for it. Weights are the user's: local folders or cached hub ids
(e.g. IDEA-Research/grounding-dino-tiny, facebook/sam-vit-base); nothing is downloaded unless allowed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from .data import MASK_SUFFIX, load_image_folder, load_rgb
from .errors import PersonalizeError
from .export import atomic_write

log = logging.getLogger("personalize")


def _load(kind: str, spec: str | None, loader, allow_download: bool):
    if not spec:
        raise PersonalizeError(f"--{kind} is required: a local {kind} model folder or a cached hub id")
    if not Path(spec).exists() and not allow_download and spec.count("/") != 1:
        raise PersonalizeError(f"--{kind} {spec}: no such folder")
    try:
        return loader(spec, local_files_only=not allow_download)
    except Exception as exc:  # noqa: BLE001 - missing files raise OSError, ValueError, ...
        raise PersonalizeError(f"--{kind} {spec}: cannot load it ({type(exc).__name__}: {str(exc)[:200]})") from exc


def save_mask(mask: np.ndarray, image_path: Path) -> Path:
    """A boolean [H, W] mask -> `NAME.mask.png` beside the image (atomic)."""
    out = image_path.with_name(f"{image_path.stem}{MASK_SUFFIX}.png")
    picture = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), "L")
    return atomic_write(out, lambda tmp: picture.save(tmp, format="PNG"))


def make_masks(images: str | Path, class_word: str, grounding_dino: str | None, sam: str | None,
               box_threshold: float = 0.3, allow_download: bool = False, overwrite: bool = False) -> list[Path]:
    """Write a mask for every image of a folder that has none (or all, with `overwrite`)."""
    import torch
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor, SamModel, SamProcessor

    load_image_folder(images, 8)  # validates the folder and every image before the heavy models load
    detector = _load("grounding-dino", grounding_dino, AutoModelForZeroShotObjectDetection.from_pretrained, allow_download)
    detector_processor = _load("grounding-dino", grounding_dino, AutoProcessor.from_pretrained, allow_download)
    segmenter = _load("sam", sam, SamModel.from_pretrained, allow_download)
    segmenter_processor = _load("sam", sam, SamProcessor.from_pretrained, allow_download)
    written = []
    for path in sorted(p for p in Path(images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")):
        if Path(path.stem).suffix == MASK_SUFFIX:
            continue
        if path.with_name(f"{path.stem}{MASK_SUFFIX}.png").exists() and not overwrite:
            continue
        image = load_rgb(path)
        with torch.no_grad():
            inputs = detector_processor(images=image, text=f"{class_word.lower()}.", return_tensors="pt")
            outputs = detector(**inputs)
            found = detector_processor.post_process_grounded_object_detection(
                outputs, inputs.input_ids, threshold=box_threshold, target_sizes=[image.size[::-1]]
            )[0]
            if len(found["boxes"]) == 0:
                raise PersonalizeError(f"{path}: no '{class_word}' found above --box-threshold {box_threshold}; lower it or draw the mask")
            box = found["boxes"][found["scores"].argmax()].tolist()
            sam_inputs = segmenter_processor(image, input_boxes=[[box]], return_tensors="pt")
            sam_out = segmenter(**sam_inputs, multimask_output=False)
            masks = segmenter_processor.post_process_masks(
                sam_out.pred_masks, sam_inputs["original_sizes"], sam_inputs["reshaped_input_sizes"]
            )[0]
        written.append(save_mask(masks[0, 0].numpy().astype(bool), path))
        log.info("wrote %s", written[-1])
    return written
