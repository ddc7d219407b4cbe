"""Shared maths of every method: one denoising step's prediction and the losses built on it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DenoiseStep:
    """One noised batch and the UNet's prediction for it, with everything a loss may need."""

    latents: torch.Tensor  # clean x0 latents
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor
    prediction: torch.Tensor
    target: torch.Tensor  # epsilon or velocity, matching the scheduler's prediction type


def sample_noise(latents: torch.Tensor, num_train_timesteps: int, generator: torch.Generator):
    """Gaussian noise and uniform timesteps, drawn from the run's own generator so a resumed run draws the same."""
    # Drawn on the CPU (where the generator lives) and moved: identical draws on every device.
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    timesteps = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=generator).to(latents.device)
    return noise, timesteps


def denoise(backbone, latents: torch.Tensor, prompt_ids: list[torch.Tensor], generator: torch.Generator,
            time_ids: torch.Tensor | None = None) -> DenoiseStep:
    """Noise `latents` at random timesteps and predict with the UNet conditioned on `prompt_ids` (gradients flow)."""
    noise, timesteps = sample_noise(latents, backbone.noise_scheduler.config.num_train_timesteps, generator)
    noisy = backbone.add_noise(latents, noise, timesteps)
    prompt_embeds, pooled = backbone.encode_prompt(prompt_ids)
    prediction = backbone.unet_forward(noisy, timesteps, prompt_embeds, pooled, time_ids)
    return DenoiseStep(latents, noise, timesteps, noisy, prediction, backbone.target(latents, noise, timesteps))


def diffusion_loss(step: DenoiseStep) -> torch.Tensor:
    """The LDM objective ||target − prediction||², mean over every element (in fp32 whatever the UNet's dtype)."""
    return F.mse_loss(step.prediction.float(), step.target.float())
