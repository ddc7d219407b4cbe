"""Shared maths of every method: one denoising step's prediction and the losses built on it.

The trainer-level loss options (`LossOptions`) live here once, so every method that uses `denoise` and
`diffusion_loss` gets them: noise offset, min-SNR-γ weighting and the masked loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossOptions:
    """What users tune after the learning rate (the trainer fills it from `--noise-offset`, `--snr-gamma`,
    `--masked-loss`, `--unmasked-weight`)."""

    noise_offset: float = 0.0  # Guttenberg's offset noise: + offset·N(0, 1) per image and channel
    snr_gamma: float | None = None  # min-SNR-γ weighting (Hang et al. 2023); None: plain MSE
    masked: bool = False  # weight the loss by the foreground mask (NAME.mask.png)
    unmasked_weight: float = 0.0  # weight of the area outside the mask when `masked`


@dataclass
class DenoiseStep:
    """One noised batch and the UNet's prediction for it, with everything a loss may need."""

    latents: torch.Tensor  # clean x0 latents
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor
    prediction: torch.Tensor
    target: torch.Tensor  # epsilon or velocity, matching the scheduler's prediction type
    snr: torch.Tensor | None = None  # [B] signal-to-noise ratio α_t²/σ_t² of each row's timestep
    prediction_type: str = "epsilon"


def sample_noise(latents: torch.Tensor, num_train_timesteps: int, generator: torch.Generator, offset: float = 0.0,
                 shard: tuple[int, int] = (0, 1)):
    """Gaussian noise and uniform timesteps, drawn from the run's own generator so a resumed run draws the same.

    With several processes (`shard` = (rank, world)) each draws the global batch's numbers and keeps its rows, so
    the run equals one process with the whole batch."""
    rank, world = shard
    b, rest = latents.shape[0], tuple(latents.shape[1:])
    mine = slice(rank * b, (rank + 1) * b)
    # Drawn on the CPU (where the generator lives) and moved: identical draws on every device.
    noise = torch.randn((b * world, *rest), generator=generator)[mine]
    if offset:  # drawn only when asked, so runs without it keep their random sequence
        noise = noise + offset * torch.randn(b * world, rest[0], 1, 1, generator=generator)[mine]
    timesteps = torch.randint(0, num_train_timesteps, (b * world,), generator=generator)[mine].to(latents.device)
    return noise.to(latents.device, latents.dtype), timesteps


def denoise(backbone, latents: torch.Tensor, prompt_ids: list[torch.Tensor], generator: torch.Generator,
            time_ids: torch.Tensor | None = None, options: LossOptions | None = None,
            shard: tuple[int, int] = (0, 1)) -> DenoiseStep:
    """Noise `latents` at random timesteps and predict with the UNet conditioned on `prompt_ids` (gradients flow)."""
    scheduler = backbone.noise_scheduler
    offset = options.noise_offset if options else 0.0
    noise, timesteps = sample_noise(latents, scheduler.config.num_train_timesteps, generator, offset, shard)
    noisy = backbone.add_noise(latents, noise, timesteps)
    prompt_embeds, pooled = backbone.encode_prompt(prompt_ids)
    prediction = backbone.unet_forward(noisy, timesteps, prompt_embeds, pooled, time_ids)
    alphas = scheduler.alphas_cumprod.to(latents.device)[timesteps].float()
    return DenoiseStep(latents, noise, timesteps, noisy, prediction, backbone.target(latents, noise, timesteps),
                       alphas / (1 - alphas), backbone.prediction_type)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023, eq. 7-8 in diffusers' form): min(SNR, γ)/SNR for ε-prediction,
    min(SNR, γ)/(SNR + 1) for v-prediction (whose MSE already carries a factor SNR + 1 in ε units)."""
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def per_sample_loss(step: DenoiseStep, options: LossOptions | None = None,
                    masks: torch.Tensor | None = None) -> torch.Tensor:
    """[B] squared error of each row, mean over its elements, weighted as `options` say.

    `masks` ([n, 1, h, w], n ≤ B) weights the first n rows' elements by m + (1 − m)·unmasked_weight, so the
    gradient outside the mask is exactly `unmasked_weight` times what it would be unmasked; rows past n (prior-
    preservation class images) are unweighted.
    """
    error = (step.prediction.float() - step.target.float()) ** 2
    if options is not None and options.masked and masks is not None:
        weight = masks + (1 - masks) * options.unmasked_weight
        error = torch.cat([error[: len(masks)] * weight, error[len(masks):]])
    loss = error.mean(dim=tuple(range(1, error.dim())))
    if options is not None and options.snr_gamma:
        loss = loss * min_snr_weights(step.snr, options.snr_gamma, step.prediction_type)
    return loss


def diffusion_loss(step: DenoiseStep, options: LossOptions | None = None, masks: torch.Tensor | None = None) -> torch.Tensor:
    """The LDM objective ||target − prediction||², mean over every element (in fp32 whatever the UNet's dtype),
    with the run's loss options."""
    return per_sample_loss(step, options, masks).mean()
