"""Train the toy world's base model: a small Stable-Diffusion-shaped pipeline that really draws toy scenes.

Same parts as SD 1.x (AutoencoderKL, UNet2DConditionModel, CLIPTextModel with the real CLIP tokenizer, DDIM
sampling), trained from scratch in two stages:

1. `train_vae`: the VAE (64×64×3 <-> 16×16×4, 4× down like SD's 8× at 512 px) on random 32×32 crops of
   renders (it is fully convolutional; crops start on the 8-px pattern grid so stripes and dots keep their
   phase), L1 + MSE + a tiny KL. It then **gates itself**: the judge reads `vae.encode → mode → decode` of
   1,000 fresh renders, and every head must reach `VAE_GATE` accuracy; the report is saved beside the VAE
   (`vae/gate.json`) and the UNet stage refuses a VAE that did not pass.
2. `train_unet`: the UNet and the text encoder together on random scenes (one or two objects) and their
   captions. SD's scaled_linear schedule with epsilon prediction, min-SNR-γ loss weighting (γ = 5; Hang et
   al. 2023) for faster convergence, a noise offset of 0.1 (else the background colour follows the initial
   noise), empty captions 10 % of the time for classifier-free guidance, EMA weights.

Both stages are step-bounded and seeded, so the same command gives the same model on the CPU or a GPU (bf16
autocast on CUDA); both checkpoint atomically every few minutes and resume exactly (`--resume`). The result is
a diffusers folder that plain `StableDiffusionPipeline.from_pretrained(folder)` loads and draws with (fp16 on
disk, loaded as float32 by every part), plus `personalize.json`: the sampler settings that suit the model.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..architectures import save_text_encoder_published, text_encoder_state_for
from ..backbone import SETTINGS_FILE  # the model folder's own settings: sampler, training templates
from ..errors import PersonalizeError
from ..tiny import clip_tokenizer, copy_clip_vocabulary
from .world import SIZE, training_sample

log = logging.getLogger("personalize")
VAE_GATE = 0.98  # every judge head on reconstructions of fresh renders
LATENT_FACTOR = 4
# Training templates in the toy grammar: its captions never say "photo" or "rendering", whose token rows stay at
# their random init, so the paper's "a photo of a {}" feeds the text encoder noise (measured: TI on the blue striped
# star learns 0.06 with the paper's templates, 0.88 with "a {}"; 300 steps, 16 samples).
PROMPT_TEMPLATES = {"object": ["a {}"]}
SAMPLER_DEFAULTS = {"inference_steps": 25, "guidance": 4.0}


@dataclass
class ToyTrainingConfig:
    """Everything that decides the toy model; identical on every device."""

    seed: int = 0
    pool_size: int = 40_000  # rendered scenes (each with one caption) the stages sample from
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    unet_steps: int = 10_000
    batch: int = 32
    lr: float = 4e-4
    warmup_steps: int = 500
    snr_gamma: float = 5.0
    noise_offset: float = 0.1
    ema_decay: float = 0.9995
    checkpoint_minutes: float = 5.0
    gate_samples: int = 1000  # fresh renders the VAE gate reconstructs


def build_parts():
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        sample_size=SIZE,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu",
    ))
    unet = UNet2DConditionModel(  # 16×16 latents; cross-attention at 8×8, 4×4 and the middle (none at 16×16: its cost)
        sample_size=SIZE // LATENT_FACTOR, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=128, attention_head_dim=8, norm_num_groups=16,
    )
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return vae, text_encoder, unet, scheduler


POOL_CHUNK = 1000  # scenes per independently seeded chunk: the pool is the same for any number of workers


def _render_chunk(seed_and_count: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    rng = random.Random(seed_and_count[0])
    samples = [training_sample(rng) for _ in range(seed_and_count[1])]
    return np.stack([np.asarray(image) for image, _, _ in samples]), [text for _, text, _ in samples]


def sample_pool(n: int, seed: int, workers: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """n random scenes as a uint8 tensor [n, 3, SIZE, SIZE] and their captions, rendered on every CPU core.

    Chunk k of POOL_CHUNK scenes draws from its own seed (seed × 1,000,003 + k), so the pool depends on `seed` and
    `n` only, not on the number of workers (16 cores render 100,000 scenes in seconds, one core in minutes)."""
    import multiprocessing
    import os

    jobs = [(seed * 1_000_003 + k, min(POOL_CHUNK, n - start)) for k, start in enumerate(range(0, n, POOL_CHUNK))]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    images, captions = [], []
    # fork: workers need only the renderer (numpy, PIL), and spawn would re-run an unguarded caller's script
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with context.Pool(workers) if workers > 1 else _InProcess() as pool:
        for chunk_images, chunk_captions in tqdm(pool.imap(_render_chunk, jobs), total=len(jobs), desc="render",
                                                 dynamic_ncols=True, mininterval=5):
            images.append(chunk_images)
            captions += chunk_captions
    return torch.from_numpy(np.concatenate(images)).permute(0, 3, 1, 2).contiguous(), captions


class _InProcess:
    """Pool's imap without processes (one worker)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    imap = staticmethod(map)


def to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1


def _device() -> tuple[torch.device, torch.dtype | None]:
    """CUDA with bf16 autocast where there is one; else the CPU in float32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _crops(pixels: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """One random size×size crop per image, starting on the 8-px pattern grid."""
    starts = torch.randint(0, (SIZE - size) // 8 + 1, (len(pixels), 2), generator=g) * 8
    return torch.stack([p[:, y:y + size, x:x + size] for p, (y, x) in zip(pixels, starts.tolist())])


# -- stage 1: the VAE ------------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruct(vae, pixels: torch.Tensor, chunk: int = 100) -> torch.Tensor:
    """vae.encode → mode → decode, in [-1, 1]."""
    out = [vae.decode(vae.encode(c.to(vae.device)).latent_dist.mode()).sample.clamp(-1, 1).cpu() for c in pixels.split(chunk)]
    return torch.cat(out)


@torch.no_grad()
def vae_report(vae, judge=None, n: int = 1000, seed: int = 1) -> dict[str, float]:
    """The judge's accuracy per head on VAE reconstructions of n fresh renders (one- and two-object scenes)."""
    from .judge import ToyJudge, _batch, accuracy_by_head

    judge = judge or ToyJudge.load()
    pixels, labels = _batch(random.Random(seed), n)
    was_training = vae.training
    vae.eval()
    recon = reconstruct(vae, pixels)
    vae.train(was_training)
    out = judge.net(recon)
    return accuracy_by_head({k: v.argmax(-1) for k, v in out.items()}, labels)


def gate_passed(report: dict[str, float]) -> bool:
    return bool(report) and min(report.values()) >= VAE_GATE


def train_vae(output: str | Path, cfg: ToyTrainingConfig = ToyTrainingConfig(), resume: bool = False, pool=None) -> dict:
    """Train the VAE into `output`/vae (a diffusers folder with `gate.json`); return the gate report."""
    from diffusers import AutoencoderKL

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    checkpoint = output / "vae-checkpoint.pt"
    device, amp = _device()
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    vae = build_parts()[0].to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.05)
    step = 0
    if resume and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        g.set_state(state["generator"])
        step = state["step"]
    pool = pool if pool is not None else sample_pool(cfg.pool_size, cfg.seed)[0]
    next_save = time.monotonic() + cfg.checkpoint_minutes * 60
    progress = tqdm(total=cfg.vae_steps, initial=step, desc="vae", dynamic_ncols=True, mininterval=5)
    while step < cfg.vae_steps:
        rows = torch.randint(0, len(pool), (cfg.vae_batch,), generator=g)
        x = to_unit(_crops(pool[rows], SIZE // 2, g)).to(device)
        with _autocast(device, amp):
            dist = vae.encode(x).latent_dist
            recon = vae.decode(dist.sample(generator=g)).sample.float()
        loss = F.mse_loss(recon, x) + F.l1_loss(recon, x) + 1e-6 * dist.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        progress.update(1)
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
        if time.monotonic() > next_save or step == cfg.vae_steps:
            next_save = time.monotonic() + cfg.checkpoint_minutes * 60
            _save_state(checkpoint, {"vae": vae.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                                     "generator": g.get_state(), "step": step})
    progress.close()

    with torch.no_grad():
        latents = torch.cat([vae.encode(to_unit(c).to(device)).latent_dist.mean.float().cpu() for c in pool[:2048].split(256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    report = vae_report(vae.float(), n=cfg.gate_samples)
    log.info("VAE gate (judge on reconstructions of 1000 fresh renders, need >= %.2f each): %s", VAE_GATE,
             ", ".join(f"{k} {v:.3f}" for k, v in report.items()))
    vae.cpu().save_pretrained(output / "vae", safe_serialization=True)
    (output / "vae" / "gate.json").write_text(json.dumps({"gate": VAE_GATE, "passed": gate_passed(report), "accuracy": report,
                                                         "steps": cfg.vae_steps, "renders": cfg.gate_samples}, indent=1))
    return report


def load_gated_vae(output: Path):
    """The VAE of `output`/vae, refused unless its gate passed."""
    from diffusers import AutoencoderKL

    gate_file = output / "vae" / "gate.json"
    if not gate_file.exists():
        raise PersonalizeError(f"no trained VAE in {output / 'vae'}; run `personalize toyworld train-vae --output {output}` first")
    gate = json.loads(gate_file.read_text())
    if not gate["passed"]:
        worst = min(gate["accuracy"], key=gate["accuracy"].get)
        raise PersonalizeError(f"the VAE in {output / 'vae'} failed its gate ({worst} {gate['accuracy'][worst]:.3f} < "
                               f"{gate['gate']}): the UNet is trained only on a VAE that passes; train it longer (--vae-steps)")
    return AutoencoderKL.from_pretrained(output / "vae")


# -- stage 2: the UNet and the text encoder --------------------------------------------------------------------


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weights of an epsilon-prediction loss: min(SNR(t), γ) / SNR(t)."""
    alpha = alphas_cumprod[timesteps]
    snr = alpha / (1 - alpha)
    return torch.clamp(snr, max=gamma) / snr


def _encoded_pool(output: Path, vae, cfg: ToyTrainingConfig, pool, device):
    """(latent mean, latent std, captions) of the scene pool, encoded once and kept in `output` so a resumed
    stage skips the rendering and encoding (minutes on a CPU)."""
    cache = output / "pool-latents.pt"
    key = {"seed": cfg.seed, "pool_size": cfg.pool_size, "vae": (output / "vae" / "gate.json").read_text()}
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        if saved["key"] == json.dumps(key):
            return saved["mean"], saved["std"], saved["captions"]
    images, captions = pool if pool is not None else sample_pool(cfg.pool_size, cfg.seed)
    scale = vae.config.scaling_factor
    with torch.no_grad():
        dist = [vae.encode(to_unit(c).to(device)).latent_dist for c in tqdm(images.split(500), desc="encode", mininterval=5)]
        mean = torch.cat([d.mean.float().cpu() for d in dist]) * scale
        std = torch.cat([d.std.float().cpu() for d in dist]) * scale
    _save_state(cache, {"key": json.dumps(key), "mean": mean, "std": std, "captions": captions})
    return mean, std, captions


def train_unet(output: str | Path, cfg: ToyTrainingConfig = ToyTrainingConfig(), resume: bool = False, pool=None,
               stop_after_minutes: float | None = None, init_from: str | Path | None = None) -> Path:
    """Train the UNet and text encoder on the gated VAE's latents; save the pipeline into `output`.

    `stop_after_minutes` ends the stage early, at the first step past that wall time, and saves it as if
    `unet_steps` had been that step (the lr is constant after warm-up, so nothing else depends on the total);
    training.json records the step reached. For a lent machine of fixed time. `init_from` (a model folder of the
    same architecture) starts the UNet and text encoder from its weights instead of at random: a continued training,
    recorded in training.json with the earlier model's own record."""
    from diffusers import StableDiffusionPipeline

    output = Path(output)
    checkpoint = output / "unet-checkpoint.pt"
    device, amp = _device()
    vae = load_gated_vae(output).to(device).requires_grad_(False).eval()
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    _, text_encoder, unet, scheduler = build_parts()
    if init_from is not None:
        _load_weights(Path(init_from), unet, text_encoder)
    unet, text_encoder = unet.to(device), text_encoder.to(device)
    tokenizer = clip_tokenizer()
    mean, std, captions = _encoded_pool(output, vae, cfg, pool, device)
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)  # no decay: unused vocabulary rows keep their init
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    alphas = scheduler.alphas_cumprod
    step, losses, pending = 0, [], []
    if resume and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        for module, key in ((unet, "unet"), (text_encoder, "text"), (ema_unet, "ema_unet"), (ema_text, "ema_text"),
                            (opt, "opt"), (sched, "sched")):
            module.load_state_dict(state[key])
        g.set_state(state["generator"])
        step, losses = state["step"], state["losses"]
        log.info("resumed the UNet stage at step %d", step)
    next_save = time.monotonic() + cfg.checkpoint_minutes * 60
    deadline = time.monotonic() + stop_after_minutes * 60 if stop_after_minutes else float("inf")
    progress = tqdm(total=cfg.unet_steps, initial=step, desc="unet+text", dynamic_ncols=True, mininterval=5)
    while step < cfg.unet_steps:
        if time.monotonic() > deadline:
            log.info("stopping the UNet stage at step %d of %d (--stop-after-minutes %s)", step, cfg.unet_steps, stop_after_minutes)
            cfg = replace(cfg, unet_steps=step)
            break
        rows = torch.randint(0, len(mean), (cfg.batch,), generator=g)
        x0 = mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=g)
        noise = torch.randn(x0.shape, generator=g) + cfg.noise_offset * torch.randn(cfg.batch, x0.shape[1], 1, 1, generator=g)
        t = torch.randint(0, 1000, (cfg.batch,), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(device)
        with _autocast(device, amp):
            pred = unet(noisy, t.to(device), encoder_hidden_states=text_encoder(ids[rows].to(device))[0]).sample.float()
        per_sample = F.mse_loss(pred, noise.to(device), reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(alphas, t, cfg.snr_gamma).to(device)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():  # one fused update per model: hundreds of tiny kernels on a GPU otherwise
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                torch._foreach_lerp_(list(ema.parameters()), list(live.parameters()), 1 - decay)
        pending.append(loss.detach())  # read back every 50 steps: a .item() per step would stall a GPU each step
        step += 1
        progress.update(1)
        now = time.monotonic()
        saving = now > next_save or step == cfg.unet_steps or now > deadline
        if step % 50 == 0 or saving:
            losses += torch.stack(pending).float().cpu().tolist()
            pending.clear()
            progress.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if saving:
            next_save = time.monotonic() + cfg.checkpoint_minutes * 60
            _save_state(checkpoint, {
                "unet": unet.state_dict(), "text": text_encoder.state_dict(), "ema_unet": ema_unet.state_dict(),
                "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "generator": g.get_state(), "step": step, "losses": losses,
            })
    progress.close()
    save_pipeline(output, vae.cpu(), ema_text.cpu(), tokenizer, ema_unet.cpu(), scheduler)
    record = {**asdict(cfg), "final_loss": float(np.mean(losses[-200:])) if losses else None, "device": str(device),
              "vae_gate": json.loads((output / "vae" / "gate.json").read_text())}
    if init_from is not None:
        earlier = Path(init_from) / "training.json"
        record["continued_from"] = json.loads(earlier.read_text()) if earlier.exists() else str(init_from)
    (output / "training.json").write_text(json.dumps(record, indent=1))
    return output


def _load_weights(folder: Path, unet, text_encoder) -> None:
    """The UNet's and text encoder's weights of a saved toy model, into freshly built parts (float32)."""
    from safetensors.torch import load_file

    for module, file in ((unet, folder / "unet" / "diffusion_pytorch_model.safetensors"),
                         (text_encoder, folder / "text_encoder" / "model.safetensors")):
        if not file.exists():
            raise PersonalizeError(f"--init-from {folder}: no {file.relative_to(folder)}")
        state = {k: v.float() for k, v in load_file(file).items()}
        if module is text_encoder:
            state = text_encoder_state_for(module, state)
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise PersonalizeError(f"--init-from {folder}: {file.name} does not fit this architecture "
                                   f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def save_pipeline(output: Path, vae, text_encoder, tokenizer, unet, scheduler, sampler: dict | None = None) -> None:
    """A diffusers folder in fp16 that every part loads as float32 (diffusers upcasts by default; transformers 5
    keeps a checkpoint's dtype unless its config names one, so the text encoder's config says float32)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(output, safe_serialization=True)
    save_text_encoder_published(output / "text_encoder")  # loadable by transformers 4 too
    copy_clip_vocabulary(output / "tokenizer")  # so is the tokenizer
    config_file = output / "text_encoder" / "config.json"
    config = json.loads(config_file.read_text())
    config.update({"dtype": "float32", "torch_dtype": "float32"})
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    (output / SETTINGS_FILE).write_text(json.dumps({"sampler": sampler or SAMPLER_DEFAULTS, "prompt_templates": PROMPT_TEMPLATES}, indent=1))


def train_base(output: str | Path, cfg: ToyTrainingConfig = ToyTrainingConfig(), resume: bool = False,
               stop_after_minutes: float | None = None, init_from: str | Path | None = None) -> Path:
    """Both stages: the VAE (skipped when `output`/vae already passed its gate), then the UNet."""
    output = Path(output)
    gate_file = output / "vae" / "gate.json"
    pool = None
    if not (gate_file.exists() and json.loads(gate_file.read_text())["passed"]):
        pool = sample_pool(cfg.pool_size, cfg.seed)
        train_vae(output, cfg, resume=resume, pool=pool[0])
    return train_unet(output, cfg, resume=resume, pool=pool, stop_after_minutes=stop_after_minutes, init_from=init_from)
