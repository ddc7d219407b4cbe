"""SingleInsert (papers/singleinsert.md): one image -> a concept that obeys the prompt.

An image encoder E_i predicts the placeholder's vector from the image; the prompt is "<concept> <class>". With
x*_θ, x̄_θ, x̂_θ the x0 implied by the UNet's prediction (eq. 1 inverted; v-prediction handled by the backbone):

    eq. 3  L_fg = m_f · ||x*_θ − x0||²                x*_θ: open model, prompt "<concept> class"
    eq. 4  L_bg = (1 − m_f) · ||x*_θ − x̄_θ||²          x̄_θ: FIXED model, prompt "class"
    eq. 5  Stage I:  L = L_fg + γ·L_bg                 train E_i only (50 it., lr 1e-4 in the paper)
    eq. 6  L_sm = ||x̂_θ − x̄_θ||²                       x̂_θ: open model (LoRA), prompt "class"
    eq. 7  Stage II: L = L_fg + γ·L_bg + η·L_sm         E_i + rank-4 LoRA on UNet and text encoder(s)
                                                       (100 it., lr 5e-5)

Choices and fixes:
- Scale of the predicted vector: v = r · normalize(u_class + W·h(I)), W zero-initialised, so training starts at
  the class word's direction. The paper is silent on the scale; the official code does not normalise, and its
  outputs are ~100× a real token's norm (norm ~44 against ~0.4 on SD; ~32 against 0.226 on the toy model). Default
  r = `NORM_OVER_VOCABULARY` (5) × the mean norm of the text encoder's vocabulary vectors: on the toy model r at the
  vocabulary's mean (an earlier default) drew the concept from "a S" in 0.35 of samples, r at 4.4× and 13× the mean
  in 0.94, r at 133× began to lose the prompt (benchmarks/README.md, Peers). A multiple, not a number, because
  each model's vocabulary has its own scale. `--vector-norm` sets r itself.
- x0 comes from the backbone for epsilon and v-prediction (the official code assumes epsilon).
- The "fixed model" of L_bg and L_sm is the base model with every LoRA switched off, text encoder included
  (the paper's text); `--semantic-reference lora-text-encoder` encodes the class prompt with the LoRA text encoder
  instead (the official code).
- Loss reduction (`--loss-reduction`): `mean` over every element (the official code, default) or `mask`: each
  masked loss divided by its region's area, so a small object is not drowned by its background.
- Several images are allowed: each prompt row gets the vector of its own image; the saved embedding is the
  vector of the first image (the usual case is one image).
- Encoders: `cnn` (default, a small 5-layer CNN, the paper's Table 3 alternative) or `clip-vit` started from a
  local CLIP vision tower (`--encoder-weights PATH|hub-id`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..concepts import add_placeholder_tokens, concept_embedding
from ..errors import PersonalizeError
from ..export import run_name, save_embeddings, save_safetensors
from ..howto import write_howto
from ..lora import TEXT_TARGETS, UNET_TARGETS, add_lora
from ..losses import sample_noise
from .base import Batch, Method
from .dreambooth_lora import adapter_layers, save_lora_files


@dataclass
class SingleInsertConfig:
    token: str = field(default="<concept>", metadata={"help": "placeholder word for the concept", "aliases": ["--placeholder_token"]})
    class_word: str | None = field(default=None, metadata={"help": "the concept's class noun, e.g. face (required)"})
    masks: str | None = field(default=None, metadata={"help": "folder of masks named like the images (default: NAME.mask.png beside each image)"})
    encoder: str = field(default="cnn", metadata={"help": "image encoder E_i", "choices": ["cnn", "clip-vit"]})
    encoder_weights: str | None = field(default=None, metadata={"help": "CLIP vision tower (folder or hub id) for --encoder clip-vit"})
    stage1_steps: int = field(default=50, metadata={"help": "Stage I iterations (encoder only; the paper: 50)"})
    stage2_steps: int = field(default=100, metadata={"help": "Stage II iterations (encoder + LoRA; the paper: 100); 0 = Stage I only"})
    stage1_batch_size: int = field(default=16, metadata={"help": "Stage I batch (the paper: 16; --batch-size overrides both stages)"})
    stage2_batch_size: int = field(default=4, metadata={"help": "Stage II batch (the paper: 4; --batch-size overrides both stages)"})
    stage2_lr: float | None = field(default=None, metadata={"help": "Stage II learning rate (default: half of --lr: the paper's "
                                                                  "5e-5 after Stage I's 1e-4; never scaled by batch size unless --scale-lr)"})
    rank: int = field(default=4, metadata={"help": "LoRA rank of Stage II"})
    fg_loss: bool = field(default=True, metadata={"help": "ablation switch: L_fg (off: plain reconstruction loss on the whole image)"})
    bg_weight: float = field(default=1.0, metadata={"help": "γ of eq. 5 and 7 (0 disables L_bg)"})
    sm_weight: float = field(default=1.0, metadata={"help": "η of eq. 7 (0 disables L_sm)"})
    semantic_reference: str = field(default="fixed", metadata={"help": "what x̄ is conditioned by", "choices": ["fixed", "lora-text-encoder"]})
    loss_reduction: str = field(default="mean", metadata={"help": "mean over all elements, or over the mask's area", "choices": ["mean", "mask"]})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    vector_norm: float | None = field(default=None, metadata={"help": "norm r of the predicted vector (default: 5 × the "
                                                                      "mean norm of the vocabulary's vectors)"})


# The default norm of the predicted vector over the vocabulary's mean norm (module docstring: why a multiple, why 5).
NORM_OVER_VOCABULARY = 5.0


class SmallCNN(nn.Module):
    """A 5-layer strided CNN: image [B, 3, H, W] in [-1, 1] -> feature [B, 256]."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers, channels = [], 3
        for out in (width, width * 2, width * 4, width * 8, width * 8):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            channels = out
        self.net = nn.Sequential(*layers)
        self.out_dim = channels

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(F.interpolate(pixels, size=(128, 128), mode="bilinear", antialias=True)).mean(dim=(2, 3))


class ClipVit(nn.Module):
    """A CLIP vision tower (pooled output), from local weights or a cached hub id."""

    MEAN = (0.48145466, 0.4578275, 0.40821073)
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, weights: str | None):
        super().__init__()
        from transformers import CLIPVisionModel

        if not weights:
            raise PersonalizeError("--encoder clip-vit needs --encoder-weights: a CLIP vision model folder or cached hub id")
        try:
            self.model = CLIPVisionModel.from_pretrained(weights, local_files_only=True)  # never a surprise download
        except Exception as exc:  # noqa: BLE001 - missing files raise OSError, ValueError, ...
            raise PersonalizeError(f"could not load the CLIP vision tower {weights!r} ({exc})") from exc
        self.size = self.model.config.image_size
        self.out_dim = self.model.config.hidden_size
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.interpolate((pixels + 1) / 2, size=(self.size, self.size), mode="bicubic", antialias=True)
        return self.model(pixel_values=(x - self.mean) / self.std).pooler_output


class ImageToToken(nn.Module):
    """E_i: image -> one vector per text encoder, on the scale of real token embeddings (see module docstring)."""

    def __init__(self, trunk: nn.Module, class_vectors: list[torch.Tensor], norms: list[float]):
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(trunk.out_dim, len(u)) for u in class_vectors)
        for head in self.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        for i, (u, r) in enumerate(zip(class_vectors, norms)):
            self.register_buffer(f"start_{i}", u.detach().float().clone())
            self.register_buffer(f"norm_{i}", torch.tensor(float(r)))

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        h = self.trunk(pixels)
        out = []
        for i, head in enumerate(self.heads):
            direction = F.normalize(getattr(self, f"start_{i}") + head(h), dim=-1)
            out.append((getattr(self, f"norm_{i}") * direction).unsqueeze(1))  # [B, 1, d]
        return out


class PredictedVectors(nn.Module):
    """The concept source: the vectors the method set for this forward ([B, 1, d]), else image 0's ([1, d])."""

    def __init__(self, encoder: ImageToToken, index: int, reference: torch.Tensor):
        super().__init__()
        self.encoder, self.index = [encoder], index  # a list: not a submodule (the method owns the encoder)
        self.register_buffer("reference", reference[:1].clone())  # the first training image
        self.current: torch.Tensor | None = None

    def forward(self) -> torch.Tensor:
        if self.current is not None:
            return self.current
        return self.encoder[0](self.reference)[self.index][0]


@contextmanager
def lora_disabled(*models):
    """The fixed model: every LoRA layer of `models` bypassed, without peft's set_adapter side effects."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, value in zip(layers, saved):
            layer._disable_adapters = value


class SingleInsert(Method):
    name = "singleinsert"
    config_class = SingleInsertConfig
    default_lr = 1e-4  # Section 4: Stage I at 1e-4, Stage II at 5e-5, as absolute rates
    scales_lr = False
    # Mirrors on (the base default), though the paper's code never flips: the only rows without (--vector-norm 1, seed 0,
    # 3 concepts, Peers in benchmarks/README.md) read better on black and edits; too few to change a default on.
    flips = True
    needs_masks = True
    uses_images = True
    multi_concept = False  # one image, one concept: the paper's setting (train concepts apart, compose at generation)
    loss_options = ("noise_offset",)  # its losses are masked by design and live in x0 space: no min-SNR, no --masked-loss

    @classmethod
    def prompt_subject(cls, settings: dict) -> str:
        return f"{settings.get('token') or '<concept>'} {settings['class_word']}"  # trained on "<concept> class"

    @classmethod
    def check(cls, config: SingleInsertConfig, concepts: list) -> None:
        if not config.class_word or len(config.class_word.split()) != 1:
            raise PersonalizeError("--class-word is required: one word for the concept's class, e.g. --class-word face")
        if config.vector_norm is not None and not config.vector_norm > 0:
            raise PersonalizeError(f"--vector-norm must be positive (got {config.vector_norm})")

    def __init__(self, config: SingleInsertConfig, backbone, captions=None, images=None, **data):
        super().__init__()
        self.check(config, [])
        if images is None:
            raise PersonalizeError("singleinsert needs its training images")
        self.config, self.backbone = config, backbone
        self.default_steps = config.stage1_steps + config.stage2_steps
        class_vectors, norms = [], []
        for tokenizer, encoder in zip(backbone.tokenizers, backbone.text_encoders):
            ids = tokenizer(config.class_word, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise PersonalizeError(f"--class-word {config.class_word!r} is not one token for the tokenizer; pick a common single word")
            table = encoder.get_input_embeddings().weight.detach()
            class_vectors.append(table[ids[0]])
            norms.append(config.vector_norm or NORM_OVER_VOCABULARY * table.float().norm(dim=1).mean().item())
        trunk = SmallCNN() if config.encoder == "cnn" else ClipVit(config.encoder_weights)
        self.image_encoder = ImageToToken(trunk, class_vectors, norms)
        self.register_buffer("images", images.clone())
        self.sources = []
        for i, (tokenizer, encoder) in enumerate(zip(backbone.tokenizers, backbone.text_encoders)):
            first_id = add_placeholder_tokens(tokenizer, config.token, 1)[0]
            source = PredictedVectors(self.image_encoder, i, images)
            concept_embedding(encoder).add(config.token, first_id, source)
            self.sources.append(source)
        self.source_modules = nn.ModuleList(self.sources)  # so that .to(device) moves their buffers
        self.lora = nn.ParameterList()
        if config.stage2_steps > 0:
            self.lora.extend(add_lora(backbone.unet, "default", config.rank, None, UNET_TARGETS))
            for encoder in backbone.text_encoders:
                self.lora.extend(add_lora(encoder, "default", config.rank, None, TEXT_TARGETS))
        prompt = f"{config.token} {config.class_word}"
        self.concept_ids = backbone.tokenize([prompt])
        self.class_ids = backbone.tokenize([config.class_word])

    # -- schedule ----------------------------------------------------------------------------------------------
    def param_groups(self):
        groups = {"stage1": list(self.image_encoder.parameters())}
        if self.config.stage2_steps > 0:
            groups["stage2"] = list(self.image_encoder.parameters()) + list(self.lora)
        return groups

    def learning_rates(self, lr: float) -> dict[str, float]:
        return {"stage2": lr / 2 if self.config.stage2_lr is None else self.config.stage2_lr}

    def batch_size(self, group: str) -> int:
        return self.config.stage1_batch_size if group == "stage1" else self.config.stage2_batch_size

    def schedule(self, step: int) -> list[str]:
        return ["stage1"] if step < self.config.stage1_steps or self.config.stage2_steps == 0 else ["stage2"]

    # -- loss --------------------------------------------------------------------------------------------------
    def _masked(self, err: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Weighted squared error reduced by --loss-reduction (weights are the mask or its complement)."""
        weighted = weight * err
        if self.config.loss_reduction == "mean":
            return weighted.mean()
        return weighted.sum() / (weight.expand_as(err).sum()).clamp_min(1e-8)

    def _x0(self, noisy, t, ids: list[torch.Tensor], time_ids=None) -> torch.Tensor:
        embeds, pooled = self.backbone.encode_prompt(ids)
        return self.backbone.predict_x0(noisy, self.backbone.unet_forward(noisy, t, embeds, pooled, time_ids).float(), t)

    def encoder_inputs(self, batch: Batch) -> torch.Tensor:
        """The image each row reconstructs, mirrored where the row is a mirror: E_i must predict the vector of the
        picture the loss compares with (a deliberate choice; feeding the unflipped source to a flipped target
        would train the vector to stand for both orientations, an augmentation the paper does not describe)."""
        images = self.images[batch.image_indices.to(self.images.device)]
        if batch.flipped is None:
            return images
        return torch.where(batch.flipped.to(images.device).view(-1, 1, 1, 1), images.flip(-1), images)

    def loss(self, batch: Batch, group: str):
        cfg, b = self.config, len(batch.latents)
        x0, mask = batch.latents, batch.masks
        offset = batch.options.noise_offset if batch.options else 0.0
        noise, t = sample_noise(x0, self.backbone.noise_scheduler.config.num_train_timesteps, batch.generator, offset, batch.shard)
        noisy = self.backbone.add_noise(x0, noise, t)
        vectors = self.image_encoder(self.encoder_inputs(batch))
        for source, v in zip(self.sources, vectors):  # rows: b concept prompts, then b class prompts
            source.current = torch.cat([v, v])
        try:
            ids = [torch.cat([c.expand(b, -1), k.expand(b, -1)]) for c, k in zip(self.concept_ids, self.class_ids)]
            time_ids = torch.cat([batch.time_ids, batch.time_ids]) if batch.time_ids is not None else None
            both = self._x0(torch.cat([noisy, noisy]), torch.cat([t, t]), ids, time_ids)
        finally:
            for source in self.sources:
                source.current = None
        x_star, x_hat = both[:b], both[b:]  # x*_θ ("<concept> class"), x̂_θ ("class", open model)
        if group == "stage1":
            x_bar = x_hat.detach()  # the model is not trained in Stage I: open = fixed
        else:
            x_bar = self._fixed_class_x0(noisy, t, b, batch.time_ids)
        fg = mask if cfg.fg_loss else torch.ones_like(mask)
        l_fg = self._masked((x_star - x0.float()) ** 2, fg)
        l_bg = self._masked((x_star - x_bar) ** 2, 1 - mask)
        loss = l_fg + cfg.bg_weight * l_bg
        logs = {"fg": l_fg.item(), "bg": l_bg.item()}
        if group == "stage2" and cfg.sm_weight:
            l_sm = F.mse_loss(x_hat, x_bar)
            loss = loss + cfg.sm_weight * l_sm
            logs["sm"] = l_sm.item()
        return loss, logs

    @torch.no_grad()
    def _fixed_class_x0(self, noisy, t, b, time_ids=None) -> torch.Tensor:
        """x̄_θ: the fixed model on the class prompt (with --semantic-reference lora-text-encoder, its text encoder keeps LoRA)."""
        ids = [k.expand(b, -1) for k in self.class_ids]
        frozen = [self.backbone.unet] + (self.backbone.text_encoders if self.config.semantic_reference == "fixed" else [])
        with lora_disabled(*frozen):
            return self._x0(noisy, t, ids, time_ids)

    def validation_prompts(self) -> list[str]:
        subject = f"{self.config.token} {self.config.class_word}"
        return [f"a photo of {subject}", f"a photo of {subject} on the beach"]

    # -- files -------------------------------------------------------------------------------------------------
    def save(self, output_dir: Path, step: int) -> list[Path]:
        output_dir = Path(output_dir)
        with torch.no_grad():
            vectors = [v[0].float().cpu() for v in self.image_encoder(self.images[:1])]
        name = run_name(output_dir)
        files = save_embeddings(output_dir, self.config.token, vectors, step=step, model_name=self.backbone.name, name=name)
        if self.config.stage2_steps > 0:
            parts = {"unet": self.backbone.unet, "text_encoder": self.backbone.text_encoders[0]}
            if len(self.backbone.text_encoders) > 1:
                parts["text_encoder_2"] = self.backbone.text_encoders[1]
            files += save_lora_files(self.backbone, output_dir, *adapter_layers(parts), step=step, name=name)
        encoder_state = {k: v.detach().float().cpu() for k, v in self.image_encoder.state_dict().items()}
        files.append(save_safetensors(output_dir / "image_encoder.safetensors", encoder_state, {"encoder": self.config.encoder}))
        return files + [write_howto(output_dir, files, [self.prompt_subject({"token": self.config.token, "class_word": self.config.class_word})])]
