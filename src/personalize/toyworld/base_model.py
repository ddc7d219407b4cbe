"""Train the toy world's base model: a small Stable-Diffusion-shaped pipeline that really draws toy scenes.

Same parts as SD 1.x (AutoencoderKL, UNet2DConditionModel, CLIPTextModel with the real CLIP tokenizer, DDIM
sampling), trained from scratch in three steps: the VAE (32×32×3 <-> 8×8×4), then the UNet and the text
encoder together on random scenes and captions. What the feasibility probes taught is built in: SD's
scaled_linear schedule with epsilon prediction, a noise offset of 0.1 (else the background colour follows the
initial noise), empty captions 10 % of the time for classifier-free guidance, EMA weights.

Seeded and resumable (`--resume`); the result is a diffusers folder that `StableDiffusionPipeline.
from_pretrained` loads, saved in fp16.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..tiny import clip_tokenizer
from .world import SIZE, training_sample

log = logging.getLogger("personalize")


def build_parts():
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        sample_size=SIZE,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu",
    ))
    unet = UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return vae, text_encoder, unet, scheduler


def sample_pool(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n random scenes as a uint8 tensor [n, 3, 32, 32] and their captions."""
    rng = random.Random(seed)
    images, captions = [], []
    for _ in range(n):
        image, text, _ = training_sample(rng)
        images.append(np.asarray(image))
        captions.append(text)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions


def to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1


def train_vae(vae, pool: torch.Tensor, steps: int, batch: int, g: torch.Generator) -> float:
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for step in tqdm(range(steps), desc="vae", dynamic_ncols=True):
        x = to_unit(pool[torch.randint(0, len(pool), (batch,), generator=g)])
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(generator=g)).sample
        kl = dist.kl().mean()
        loss = F.mse_loss(recon, x) + 1e-6 * kl
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        latents = torch.cat([vae.encode(to_unit(c)).latent_dist.mean for c in pool[:2048].split(256)])
    return float(1.0 / latents.std())


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train_base(output: str | Path, minutes: float = 40.0, vae_steps: int = 800, batch: int = 32, seed: int = 0,
               pool_size: int = 40_000, lr: float = 3e-4, resume: bool = False, checkpoint_minutes: float = 5.0) -> Path:
    """Train and save the toy base model into `output` (a diffusers folder).

    Time-bounded: the UNet stage stops after `minutes` of wall time in total (resumed runs count the time already
    spent). A checkpoint (`output/checkpoint.pt`) is written every `checkpoint_minutes`; `resume` continues it.
    """
    from diffusers import StableDiffusionPipeline

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    checkpoint = output / "checkpoint.pt"
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae, text_encoder, unet, scheduler = build_parts()
    tokenizer = clip_tokenizer()
    pool, captions = sample_pool(pool_size, seed)
    log.info("toy world: %d scenes rendered", len(pool))
    state = torch.load(checkpoint, weights_only=True) if resume and checkpoint.exists() else None

    if state is None:
        scale = train_vae(vae, pool, vae_steps, batch, g)
    else:
        vae.load_state_dict(state["vae"])
        scale = state["scale"]
    vae.register_to_config(scaling_factor=scale)
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        dist = [vae.encode(to_unit(c)).latent_dist for c in pool.split(512)]
        mean = torch.cat([d.mean for d in dist]) * scale
        std = torch.cat([d.std for d in dist]) * scale
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # no decay: unused vocabulary rows keep their init
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    alphas = scheduler.alphas_cumprod
    step, spent, losses = 0, 0.0, []
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"])
        step, spent, losses = state["step"], state["spent"], state["losses"]
    started = time.monotonic()
    deadline = started + minutes * 60 - spent
    next_save = started + checkpoint_minutes * 60
    progress = tqdm(desc="unet+text", dynamic_ncols=True)
    while time.monotonic() < deadline:
        rows = torch.randint(0, len(pool), (batch,), generator=g)
        x0 = mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=g)
        noise = torch.randn(x0.shape, generator=g) + 0.1 * torch.randn(batch, 4, 1, 1, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(noisy, t, encoder_hidden_states=text_encoder(ids[rows])[0]).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        losses.append(loss.item())
        step += 1
        progress.update(1)
        if step % 50 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if time.monotonic() > next_save:
            next_save += checkpoint_minutes * 60
            _save_state(checkpoint, {
                "vae": vae.state_dict(), "scale": scale, "unet": unet.state_dict(), "text": text_encoder.state_dict(),
                "ema_unet": ema_unet.state_dict(), "ema_text": ema_text.state_dict(), "opt": opt.state_dict(),
                "generator": g.get_state(), "step": step, "spent": spent + time.monotonic() - started, "losses": losses,
            })
    progress.close()

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=ema_text, tokenizer=tokenizer, unet=ema_unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(output, safe_serialization=True)
    (output / "training.json").write_text(json.dumps({
        "steps": step, "batch": batch, "minutes": minutes, "vae_steps": vae_steps, "seed": seed, "lr": lr,
        "final_loss": float(np.mean(losses[-200:])), "pool_size": pool_size,
    }, indent=1))
    return output
