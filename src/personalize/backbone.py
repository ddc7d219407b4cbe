"""One object for a loaded base model; every SD 1.x / 2.x / SDXL difference lives here and nowhere else.

`load_backbone(spec)` accepts a built-in name (`tiny`, `tiny-v`, `tiny-xl`; `random:sd15`, `random:sd21`,
`random:sdxl` for real-size architectures with random weights, see `architectures/`), a local diffusers folder, a single
`.safetensors` / `.ckpt` checkpoint, or a Hugging Face hub id. The `Backbone` it returns offers what the methods
need — tokenize, encode_prompt, add_noise, the loss target, x0 from a prediction, the UNet call — with the
prediction type (epsilon or v) and SDXL's second encoder, pooled embedding and time ids handled inside.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from .errors import PersonalizeError
from .tiny import TINY_MODELS, build_tiny_pipeline

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
SETTINGS_FILE = "personalize.json"  # a model folder's own settings: {"sampler": {...}, "prompt_templates": {...}}
SD_SAMPLER = {"inference_steps": 30, "guidance": 7.5}  # what SD 1.x/2.x/XL users draw with, for folders without one


@dataclass
class Backbone:
    """A diffusers pipeline plus the few operations training needs, uniform across SD families."""

    pipe: object
    name: str
    sampler: dict = field(default_factory=lambda: dict(SD_SAMPLER))  # recommended steps / guidance of this model
    # Training prompt templates in the model's own vocabulary, by set name ("object"), where its folder gives them:
    # a model that never saw "photo" or "rendering" (the toy model) learns nothing from "a photo of a {}".
    templates: dict = field(default_factory=dict)
    cache_prompt_embeddings: bool = False  # encode each distinct prompt once (only when nothing on the text side trains)
    tokenizers: list = field(init=False)
    text_encoders: list = field(init=False)

    def __post_init__(self):
        from diffusers import DDPMScheduler

        pipe = self.pipe
        self.is_sdxl = hasattr(pipe, "text_encoder_2")
        self.tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
        self.text_encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
        self.unet, self.vae = pipe.unet, pipe.vae
        # Training noise follows the model's own schedule whatever sampler the pipeline ships with.
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise PersonalizeError(f"{self.name}: prediction type {self.prediction_type!r} is not supported (epsilon, v_prediction)")
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            _pool_at_first_eos(encoder, tokenizer.eos_token_id)

    # -- sizes -------------------------------------------------------------------------------------------------
    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_step(self) -> int:
        """Image sides must be multiples of this: the VAE's and the UNet's downsampling together (64 for SD 1.x)."""
        return self.vae_scale * 2 ** (len(self.unet.config.down_block_types) - 1)

    @property
    def default_resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale

    @property
    def embedding_dims(self) -> list[int]:
        return [e.get_input_embeddings().embedding_dim for e in self.text_encoders]

    @property
    def sd_version(self) -> str:
        """'sdxl', 'sd2' or 'sd1': the family other tools file a LoRA under (kohya's ss_v2, A1111's Lora tab).

        SDXL has two text encoders. SD 2.x is told by its one encoder, OpenCLIP ViT-H, 1024 wide in every 2.x model
        (SD 1.x's CLIP ViT-L is 768). An encoder of neither width (the built-in tiny models) counts as 2.x when the
        model predicts v, as SD 2.x 768-v does and no SD 1.x release does: so `tiny-v` stands in for SD 2.x.
        """
        if self.is_sdxl:
            return "sdxl"
        width = self.embedding_dims[0]
        return "sd2" if width == 1024 or (width != 768 and self.prediction_type == "v_prediction") else "sd1"

    # -- text --------------------------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids `[B, 77]` for each tokenizer (one for SD 1/2, two for SDXL)."""
        return [
            tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            for tok in self.tokenizers
        ]

    def encode_prompt(self, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt embeddings for the UNet (and SDXL's pooled embedding), exactly as the diffusers pipelines build them.

        With `cache_prompt_embeddings` each distinct prompt is encoded once, alone (so its embedding never depends on
        which batch first asked for it: a resumed run reads the same numbers), and reused without gradients."""
        if not self.cache_prompt_embeddings:
            return self._encode(input_ids)
        cache = self.__dict__.setdefault("_prompt_cache", {})
        keys = [tuple(tuple(ids[i].tolist()) for ids in input_ids) for i in range(len(input_ids[0]))]
        for key in dict.fromkeys(keys):
            if key not in cache:
                with torch.no_grad():
                    hidden, pooled = self._encode([torch.tensor([row]) for row in key])
                cache[key] = (hidden[0], None if pooled is None else pooled[0])
        hidden = torch.stack([cache[k][0] for k in keys])
        pooled = None if cache[keys[0]][1] is None else torch.stack([cache[k][1] for k in keys])
        return hidden, pooled

    def _encode(self, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.is_sdxl:
            encoder = self.text_encoders[0]
            return encoder(input_ids[0].to(encoder.device))[0], None
        hidden, pooled = [], None
        for ids, encoder in zip(input_ids, self.text_encoders):
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer of both encoders
            pooled = out[0]  # text_embeds of text_encoder_2 (the last one)
        return torch.cat(hidden, dim=-1), pooled

    # -- diffusion ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean and std (already multiplied by the VAE scaling factor) for images in [-1, 1]."""
        dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
        scale = self.vae.config.scaling_factor
        return (dist.mean * scale).float(), (dist.std * scale).float()

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet should predict: the noise (epsilon) or the velocity α_t·ε − σ_t·x0 (v-prediction)."""
        if self.prediction_type == "epsilon":
            return noise
        return self.noise_scheduler.get_velocity(latents, noise, timesteps)

    def predict_x0(self, noisy: torch.Tensor, model_output: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x0 implied by a prediction: (x_t − σ_t ε̂)/α_t for epsilon, α_t x_t − σ_t v̂ for v-prediction."""
        alphas = self.noise_scheduler.alphas_cumprod.to(noisy.device)[timesteps].float()
        alpha = alphas.sqrt().view(-1, 1, 1, 1)
        sigma = (1 - alphas).sqrt().view(-1, 1, 1, 1)
        if self.prediction_type == "epsilon":
            return (noisy - sigma * model_output) / alpha
        return alpha * noisy - sigma * model_output

    def default_time_ids(self, batch: int, size: int) -> torch.Tensor:
        """SDXL's (original h, w, crop top, left, target h, w) for an uncropped square image: [batch, 6]."""
        return torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32).repeat(batch, 1)

    def training_time_ids(self, images, flip: bool) -> torch.Tensor | None:
        """SDXL's time ids of each training image (then, with flip, of each mirror); None for SD 1/2."""
        return sdxl_time_ids(images, flip) if self.is_sdxl else None

    def unet_forward(self, noisy, timesteps, prompt_embeds, pooled=None, time_ids: torch.Tensor | None = None):
        """The UNet's prediction; for SDXL adds the pooled text and the size/crop time ids ([B, 6]; default: square)."""
        added = None
        if self.is_sdxl:
            if time_ids is None:
                time_ids = self.default_time_ids(noisy.shape[0], noisy.shape[-1] * self.vae_scale)
            added = {"text_embeds": pooled, "time_ids": time_ids.to(noisy.device)}
        unet_dtype = self.unet.dtype
        return self.unet(
            noisy.to(unet_dtype),
            timesteps,
            encoder_hidden_states=prompt_embeds.to(unet_dtype),
            added_cond_kwargs=added and {k: v.to(unet_dtype) for k, v in added.items()},
        ).sample

    def to(self, device, dtype: torch.dtype | None = None) -> "Backbone":
        """Move the frozen networks (and cast them to `dtype` for mixed precision)."""
        for module in [self.unet, self.vae, *self.text_encoders]:
            module.to(device=device, dtype=dtype)
        if dtype == torch.float16:
            self.vae.to(torch.float32)  # SD's VAE overflows in fp16; it runs once per image, so fp32 costs nothing
        return self

    def freeze(self) -> None:
        for module in [self.unet, self.vae, *self.text_encoders]:
            module.requires_grad_(False)
            module.eval()

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the UNet's and text encoders' activations in the backward pass. Both libraries checkpoint only in
        training mode; SD's networks have no dropout, so training mode changes nothing else."""
        self.unet.enable_gradient_checkpointing()
        self.unet.train()
        for encoder in self.text_encoders:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            encoder.train()


def _pool_at_first_eos(text_encoder, eos_token_id: int) -> None:
    """Make the pooled output read the real end-of-text position even when placeholders are in the prompt.

    Old CLIP configs (SD 1.x/2.x, SDXL's text_encoder_2) say eos_token_id = 2, which makes transformers pool at
    `argmax(input_ids)` — the placeholder, whose added id is the largest, instead of the end of text. SDXL feeds
    that pooled vector to the UNet, so any concept would corrupt it. Setting the instance attribute transformers
    reads (not a code patch; 4.x keeps it on `.text_model`, 5.x on the model) selects its first-EOS rule instead.
    End-of-text is also where A1111, Forge and ComfyUI pool. They inject vectors at prompt positions and keep the ids
    in the vocabulary. Plain diffusers needs the same attribute set on `text_encoder_2`, which is the first line of
    the README's SDXL snippet (tests/test_sdxl_pooling.py).
    """
    for module in (text_encoder, getattr(text_encoder, "text_model", None)):
        if module is not None and getattr(module, "eos_token_id", None) == 2:
            module.eos_token_id = eos_token_id


# -- loading ---------------------------------------------------------------------------------------------------

MODEL_HELP = (
    "pass --model toy or tiny (built in), random:sd15, random:sd21 or random:sdxl (real-size architectures, random "
    "weights), a local diffusers folder (with model_index.json), a single .safetensors/.ckpt checkpoint, or a hub id "
    "that is in your Hugging Face cache"
)


def sdxl_time_ids(images, flip: bool) -> torch.Tensor:
    """SDXL's (original h, w, crop top, left, target h, w) per image, then (with flip) per mirror, whose crop starts
    at resized width − left − target width from its own left edge. The target is the image's own (bucket) size."""
    rows, mirrored = [], []
    for im in images:
        h, w = im.original_size
        top, left = im.crop_top_left
        target_h, target_w = im.pixels.shape[-2:]
        rows.append([h, w, top, left, target_h, target_w])
        mirrored.append([h, w, top, im.resized_size[1] - left - target_w, target_h, target_w])
    return torch.tensor(rows + (mirrored if flip else []), dtype=torch.float32)


def sampling_device() -> torch.device:
    """Where `generate` and the bench draw: the GPU when there is one (as the trainer's Accelerator picks), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seeded_noise(seed: int) -> torch.Generator:
    """A sampler's generator for one image, seeded on the CPU: diffusers draws the starting noise there and moves it,
    so a seed gives the same image start on any device (a CUDA generator would draw other numbers)."""
    return torch.Generator().manual_seed(seed)


def load_backbone(spec: str, *, model_config: str | None = None) -> Backbone:
    """Load a base model from a built-in name, a diffusers folder, a single-file checkpoint or a hub id."""
    return Backbone(pipe=_load_pipeline(str(spec), model_config), name=str(spec), sampler=sampler_settings(spec),
                    templates=_folder_settings(spec).get("prompt_templates", {}))


def model_folder(spec: str) -> Path | None:
    """The local diffusers folder `spec` names (the toy model's for `toy`), or None.

    For `random:NAME` it is the shipped configs' folder, which holds the built folder's configs byte for byte but
    no weights: enough for reading configs, and nothing is built.
    """
    if spec == "toy":
        from .toyworld import TOY_MODEL_DIR

        return TOY_MODEL_DIR
    from .architectures import config_folder, is_random_model

    if is_random_model(spec):
        return config_folder(spec)
    path = Path(spec).expanduser()
    return path if (path / "model_index.json").is_file() else None


def _folder_settings(spec: str) -> dict:
    """The model folder's `personalize.json` (empty where there is none)."""
    import json

    folder = model_folder(str(spec))
    if folder is None or not (folder / SETTINGS_FILE).is_file():
        return {}
    try:
        settings = json.loads((folder / SETTINGS_FILE).read_text())
        if not isinstance(settings, dict) or not all(isinstance(v, dict) for v in settings.values()):
            raise ValueError("every entry must be a mapping")
        return settings
    except (OSError, ValueError) as exc:
        raise PersonalizeError(f"{folder / SETTINGS_FILE} is not readable JSON of mappings "
                               f"('sampler', 'prompt_templates'): {exc}") from exc


def sampler_settings(spec: str) -> dict:
    """Sampler steps and guidance that suit a model: its folder's `personalize.json`, else SD's usual 30 / 7.5."""
    settings = {**SD_SAMPLER, **_folder_settings(spec).get("sampler", {})}
    return {k: settings[k] for k in SD_SAMPLER}


def _load_pipeline(spec: str, model_config: str | None):
    from diffusers import DiffusionPipeline

    if spec in TINY_MODELS:
        return build_tiny_pipeline(spec)
    if spec == "toy":
        from .toyworld import TOY_MODEL_DIR

        if not (TOY_MODEL_DIR / "model_index.json").exists():
            raise PersonalizeError(f"the toy model's weights are not in {TOY_MODEL_DIR}; train them with "
                                   f"`personalize toyworld train-base --output {TOY_MODEL_DIR}`")
        return _quiet(DiffusionPipeline.from_pretrained(TOY_MODEL_DIR, **_no_safety_checker()))
    from .architectures import is_random_model, random_model_folder

    if is_random_model(spec):  # real-size configs + random weights, built once into the cache; then a plain folder
        spec = str(random_model_folder(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise PersonalizeError(f"{path} is a folder but not a diffusers model (no model_index.json); {MODEL_HELP}")
        return _quiet(DiffusionPipeline.from_pretrained(path, **_no_safety_checker()))
    if path.suffix.lower() in CHECKPOINT_SUFFIXES or spec.startswith((".", "/", "~")):
        if not path.is_file():
            raise PersonalizeError(f"model file {path} does not exist; {MODEL_HELP}")
        return _quiet(_load_single_file(path, model_config))
    if spec.count("/") != 1:
        raise PersonalizeError(f"model {spec!r} is neither a built-in name, a folder, a checkpoint nor a hub id; {MODEL_HELP}")
    return _quiet(_load_from_hub(spec))


def _no_safety_checker() -> dict:
    # float32 whatever the files hold (the toy model and many SD folders ship fp16): trainable parameters and CPU
    # inference need it; --mixed-precision casts the frozen networks down afterwards.
    return {"safety_checker": None, "requires_safety_checker": False, _dtype_keyword(): torch.float32}


def _dtype_keyword() -> str:
    """diffusers renamed `torch_dtype` to `dtype` (the old name warns since the rename)."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _is_sdxl_checkpoint(path: Path) -> bool:
    """SDXL checkpoints carry a second text encoder under `conditioner.embedders.1`."""
    if path.suffix.lower() != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            return any(k.startswith("conditioner.embedders.1") for k in f.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for corrupt headers
        raise PersonalizeError(f"{path} is not a readable .safetensors checkpoint ({exc}); {MODEL_HELP}") from exc


def _load_single_file(path: Path, model_config: str | None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if _is_sdxl_checkpoint(path) else StableDiffusionPipeline
    kwargs = {"config": model_config} if model_config else {}
    if cls is StableDiffusionPipeline:
        kwargs.update(_no_safety_checker())
    try:
        return cls.from_single_file(str(path), **kwargs)
    except Exception as exc:  # diffusers raises many kinds here; all mean the same thing to a user
        raise PersonalizeError(
            f"could not load checkpoint {path} ({type(exc).__name__}: {str(exc)[:300]}). A single-file checkpoint needs "
            "its architecture's diffusers configs: pass --model-config with a local diffusers folder of the same "
            "model family (e.g. a copy of stable-diffusion-v1-5 without weights), or allow hub access"
        ) from exc


def _hub_reachable(timeout: float = 1.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_from_hub(repo_id: str):
    from diffusers import DiffusionPipeline

    try:  # the user's cache first: no network, no waiting
        return DiffusionPipeline.from_pretrained(repo_id, local_files_only=True, **_no_safety_checker())
    except Exception as cached_error:  # noqa: BLE001 - any failure here means "not cached"
        if not _hub_reachable():
            raise PersonalizeError(
                f"model {repo_id!r} is not in the local Hugging Face cache and the hub cannot be reached; {MODEL_HELP}"
            ) from cached_error
    return DiffusionPipeline.from_pretrained(repo_id, **_no_safety_checker())
