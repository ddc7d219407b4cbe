"""What every method provides to the one trainer.

A method owns its trainable parts and its loss; the trainer owns data, optimisation, checkpoints and logging.
Several parameter sets with their own schedules (Dis²Booth's anchor and delta steps) fit by naming parameter
groups and saying, per step, which groups take a sub-step — the trainer keeps one optimiser per group and steps
only that group's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class Batch:
    """What the trainer hands a method each (sub-)step."""

    latents: torch.Tensor  # [B, C, h, w] sampled from the cached latent distributions (flips included)
    image_indices: torch.Tensor  # [B] which training image each row comes from
    generator: torch.Generator  # the run's generator: every random draw goes through it, so resume is exact
    class_latents: torch.Tensor | None = None  # prior-preservation class images, when the method asks for them
    masks: torch.Tensor | None = None  # [B, 1, h, w] foreground masks at the latent grid, when the method needs them
    time_ids: torch.Tensor | None = None  # [B, 6] SDXL size/crop conditioning of each row (None: not SDXL)


class Method(nn.Module):
    """Base class: subclasses set `name`, `config_class` and implement the four methods below."""

    name: str = ""
    config_class: type = object
    default_steps: int = 1000
    default_lr: float = 1e-4
    needs_masks: bool = False  # the trainer loads a foreground mask per image (SingleInsert)

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

    def schedule(self, step: int) -> list[str]:
        """Groups that take a sub-step at `step`, in order (one optimiser step each)."""
        return ["main"]

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
