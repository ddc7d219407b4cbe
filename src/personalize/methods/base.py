"""What every method provides to the one trainer.

A method owns its trainable parts and its loss; the trainer owns data, optimisation, checkpoints and logging.
Several parameter sets with their own schedules (Dis²Booth's anchor and delta steps) fit by naming parameter
groups, each with its own optimiser, and saying per step which sub-steps run and which groups each sub-step
updates: the trainer lets gradients reach only those groups and steps only their optimisers. A group's optimiser
state is therefore shared by every sub-step that updates it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..losses import LossOptions


@dataclass(frozen=True)
class Concept:
    """One concept of a run: how prompts name it and where its vectors start (a dataset subset's, or the flags')."""

    token: str
    class_word: str | None = None
    init_word: str | None = None


@dataclass
class Batch:
    """What the trainer hands a method each (sub-)step."""

    latents: torch.Tensor  # [B, C, h, w] sampled from the cached latent distributions (flips included)
    image_indices: torch.Tensor  # [B] which training image each row comes from
    generator: torch.Generator  # the run's generator: every random draw goes through it, so resume is exact
    class_latents: torch.Tensor | None = None  # prior-preservation class images, when the method asks for them
    masks: torch.Tensor | None = None  # [B, 1, h, w] foreground masks at the latent grid, when the method needs them
    time_ids: torch.Tensor | None = None  # [B, 6] SDXL size/crop conditioning of each row (None: not SDXL)
    flipped: torch.Tensor | None = None  # [B] bool: the row is the mirror of its image (flip augmentation)
    options: LossOptions | None = None  # the run's noise offset, min-SNR, masked loss (losses.LossOptions)
    class_indices: torch.Tensor | None = None  # [B'] which class image each prior-preservation row is
    shard: tuple[int, int] = (0, 1)  # (this process, processes): per-row draws take the global batch's, keep their share

    def draw_rows(self, draw, rows: int):
        """A per-row random draw `draw(n)` made for the whole global batch (every process draws the same numbers
        from the shared generator) and cut to this process's `rows` rows."""
        rank, world = self.shard
        return draw(rows * world)[rank * rows:(rank + 1) * rows]


class Method(nn.Module):
    """Base class: subclasses set `name`, `config_class` and implement the four methods below."""

    name: str = ""
    config_class: type = object
    default_steps: int = 1000
    default_lr: float = 1e-4
    needs_masks: bool = False  # the trainer loads a foreground mask per image (SingleInsert)
    uses_images: bool = False  # the method receives the training pixels [N, 3, R, R] (SingleInsert's image encoder)
    reads_caption_files: bool = False  # NAME.txt is the training prompt by default (DreamBooth); else only when asked
    multi_concept: bool = True  # learns several concepts in one run (a --dataset file of subsets)
    trains_text_side: bool = True  # gradients pass through the text encoder (else its prompt embeddings can be cached)
    scales_lr: bool = True  # default of --scale-lr: the rate is per image (diffusers' convention), × batch × processes
    flips: bool = True  # default of --flip: also train on each image's mirror (Textual Inversion's code and its successors)
    loss_options: tuple[str, ...] = ("noise_offset", "snr_gamma", "masked")  # the LossOptions its loss honours

    @classmethod
    def check(cls, config, concepts: list) -> None:
        """Refuse options this method cannot train with (PersonalizeError), before anything is loaded: the trainer
        calls it first, so a run fails in a second, and the web UI calls it to say so beside the field."""

    @classmethod
    def prompt_subject(cls, settings: dict) -> str:
        """How a prompt names the concept a run learned, from its resolved settings (config.yaml): the placeholder
        alone for embeddings; methods trained on "<token> <class word>" override this."""
        return settings.get("token") or "<concept>"

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by group name; each group gets its own optimiser."""
        return {"main": [p for p in self.parameters() if p.requires_grad]}

    def learning_rates(self, lr: float) -> dict[str, float]:
        """Per-group learning rate, given the run's (scaled) one; groups not named use `lr`."""
        return {}

    def optimizer_groups(self, group: str, lr: float) -> list[dict]:
        """torch parameter groups of `group`'s optimiser at rate `lr`; override to give parts their own rate
        (they still step together, on one loss)."""
        return [{"params": self.param_groups()[group], "lr": lr}]

    def batch_size(self, group: str) -> int | None:
        """Images per sub-step that updates `group` when --batch-size is not given (None: the trainer's 4)."""
        return None

    def begin_step(self, step: int) -> None:
        """Called before the sub-steps of `step` (and before gradients are switched for them)."""

    def schedule(self, step: int) -> list[str]:
        """Sub-steps at `step`, in order; each is one optimiser update of the groups `substep_groups` names."""
        return ["main"]

    def substep_groups(self, substep: str) -> list[str]:
        """Parameter groups a sub-step updates (default: the group of the same name)."""
        return [substep]

    def loss(self, batch: Batch, group: str) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def validation_prompts(self) -> list[str]:
        return []

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold to resume (trainable parameters only, never the frozen base model)."""
        names = {id(p) for group in self.param_groups().values() for p in group}
        return {k: v.detach().cpu().clone() for k, v in self.named_parameters() if id(v) in names}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Non-parameter state a resume needs (e.g. Dis²Booth's feature queues)."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def save(self, output_dir: Path, step: int) -> list[Path]:
        """Write the final artefacts (atomically) and load each back; return their paths."""
        raise NotImplementedError
