"""Textual Inversion (Gal et al. 2022): learn the vector(s) of a new word from a few images.

    v* = argmin_v  E_{z0, ε, t} || ε − ε_θ(z_t, t, c_θ(y(v))) ||²        (TI eq. 2; BaTex eq. 5)

Only the placeholder's vectors are trained (a `FreeVectors` per text encoder); the vocabulary, the text encoder
and the UNet stay frozen, so nothing else of the model can change. Defaults follow diffusers'
textual-inversion example: AdamW, lr 5e-4 multiplied by the batch size, 3000 steps for SD 1.5, the 'object'
or 'style' prompt templates of the original paper.

Multi-token init words: an init word the tokenizer splits into k pieces is accepted with `--num-vectors k`
(vector i starts at piece i) and refused otherwise, with a message naming the pieces. A single-token init word
starts every vector.

TI+LoRA (`--lora-rank r`, the "TI+DB" baseline of SingleInsert's tables, pivotal-tuning style): a rank-r LoRA on the
UNet's attention (to_q/k/v/out) trains jointly with the vectors, on the same loss and in the same optimiser step,
at its own rate (`--lora-lr`; default the vectors' rate / 5, the ratio of DreamBooth-LoRA's 1e-4 to TI's 5e-4).
The run then writes the embedding files and the diffusers and kohya LoRA files; `generate` loads both from the folder.

Several concepts in one run (a `--dataset` file of subsets): one placeholder per concept, each with its own init
word; a training row is conditioned on its own image's concept (the templates with that token, or the subset's
caption), and each concept's files are written to `OUTPUT/concepts/<name>/` exactly as a run of its own writes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..concepts import FreeVectors, add_placeholder_tokens, concept_embedding, expand_prompt
from ..errors import PersonalizeError
from ..export import CONCEPTS_DIR, run_name, save_embeddings
from ..howto import write_howto
from ..lora import UNET_TARGETS, add_lora
from ..losses import denoise, diffusion_loss
from .base import Batch, Concept, Method
from .dreambooth_lora import adapter_layers, save_lora_files

OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
]
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


@dataclass
class TextualInversionConfig:
    token: str = field(
        default="<concept>",
        metadata={"help": "placeholder word that will stand for the concept in prompts", "aliases": ["--placeholder_token"]},
    )
    init_word: str | None = field(
        default=None,
        metadata={"help": "a word close to the concept (e.g. 'cat'); its vector is the starting point", "aliases": ["--initializer_token"]},
    )
    num_vectors: int = field(default=1, metadata={"help": "vectors per placeholder (more = more capacity, less editability)"})
    templates: str = field(default="object", metadata={"help": "training prompt templates (a model folder may give its own "
                                                               "for a set: the toy model's 'object' set is 'a {}')", "choices": sorted(TEMPLATES)})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of the trained vectors"})
    lora_rank: int = field(default=0, metadata={"help": "also train a rank-r LoRA of the UNet with the vectors (TI+LoRA); 0 = plain TI"})
    lora_lr: float | None = field(default=None, metadata={"help": "learning rate of that LoRA, used as given (default: the vectors' scaled rate / 5)"})


class TextualInversion(Method):
    name = "textual-inversion"
    config_class = TextualInversionConfig
    default_steps = 3000
    default_lr = 5e-4

    @classmethod
    def check(cls, config: TextualInversionConfig, concepts: list[Concept]) -> None:
        if any(not c.init_word for c in concepts):
            raise PersonalizeError("--init-word is required: a word for what the images show, e.g. --init-word cat "
                                   "(in a --dataset file: init_word of every subset, or --init-word for all)")
        if config.num_vectors < 1:
            raise PersonalizeError("--num-vectors must be at least 1")
        if config.lora_rank < 0:
            raise PersonalizeError("--lora-rank must be 0 (no LoRA) or a positive rank")

    def __init__(self, config: TextualInversionConfig, backbone, captions: list[str | None] | None = None, images=None,
                 concepts: list[Concept] | None = None, image_concepts: list[int] | None = None, class_concepts=None):
        super().__init__()
        self.concepts = concepts or [Concept(config.token, None, config.init_word)]
        self.check(config, self.concepts)
        self.config, self.backbone = config, backbone
        self.sources = nn.ModuleList()  # [concept][text encoder]
        for concept in self.concepts:
            per_encoder = nn.ModuleList()
            for tokenizer, encoder in zip(backbone.tokenizers, backbone.text_encoders):
                init_ids = self._init_ids(tokenizer, concept.init_word)
                first_id = add_placeholder_tokens(tokenizer, concept.token, config.num_vectors)[0]
                source = self.make_source(init_ids, encoder.get_input_embeddings().weight.detach(), tokenizer)
                concept_embedding(encoder).add(concept.token, first_id, source)
                per_encoder.append(source)
            self.sources.append(per_encoder)
        self._tokenize_prompts(captions, image_concepts)
        self.lora = nn.ParameterList()
        if config.lora_rank:  # TI+LoRA (module docstring)
            self.lora.extend(add_lora(backbone.unet, "default", config.lora_rank, None, UNET_TARGETS))

    def _tokenize_prompts(self, captions, image_concepts) -> None:
        """Each image's prompt choices (its concept's templates, or its caption), tokenised once: a step picks rows.

        With one concept and no captions every image shares the templates, and a row's draw is exactly what it was
        before several concepts existed (runs stay reproducible)."""
        n_images = len(captions or image_concepts or [None])
        image_concepts = image_concepts or [0] * n_images
        captions = captions or [None] * n_images
        # The model's own templates for this set where its folder gives them (Backbone.templates), else the paper's.
        templates = self.backbone.templates.get(self.config.templates) or TEMPLATES[self.config.templates]
        prompts, choices = {}, []
        for image, concept_index in enumerate(image_concepts):
            token = self.concepts[concept_index].token
            texts = [captions[image]] if captions[image] else [t.format(token) for t in templates]
            texts = [expand_prompt(text, token, self.config.num_vectors) for text in texts]
            choices.append([prompts.setdefault(text, len(prompts)) for text in texts])
        self.prompts = list(prompts)
        self.prompt_ids = self.backbone.tokenize(self.prompts)
        self.max_choices = max(len(c) for c in choices)
        padded = [[c[i % len(c)] for i in range(self.max_choices)] for c in choices]
        self.register_buffer("prompt_choices", torch.tensor(padded), persistent=False)  # [images, choices]

    def _init_ids(self, tokenizer, word: str) -> list[int]:
        """The init word's token id for each vector (see the module docstring for the multi-token rule)."""
        n = self.config.num_vectors
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if not ids or word.strip() == "":
            raise PersonalizeError(f"--init-word {word!r} is not a word the tokenizer knows")
        if len(ids) == 1:
            return ids * n
        if len(ids) == n:
            return ids
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise PersonalizeError(
            f"--init-word {word!r} is split by the tokenizer into {len(ids)} tokens {pieces}; use a single-token word "
            f"(e.g. its main noun) or --num-vectors {len(ids)} to start one vector from each piece"
        )

    def make_source(self, init_ids: list[int], table: torch.Tensor, tokenizer) -> nn.Module:
        """The vectors' parametrisation: TI trains them directly, starting from the init word."""
        return FreeVectors(table[init_ids])

    def param_groups(self):
        return {"main": list(self.sources.parameters()) + list(self.lora)}

    @classmethod
    def prompt_subject(cls, settings: dict) -> str:
        return settings.get("token") or "<concept>"

    def optimizer_groups(self, group: str, lr: float) -> list[dict]:
        vectors = [{"params": list(self.sources.parameters()), "lr": lr}]
        return vectors + ([{"params": list(self.lora), "lr": lr / 5 if self.config.lora_lr is None else self.config.lora_lr}] if len(self.lora) else [])

    def loss(self, batch: Batch, group: str):
        picks = batch.draw_rows(lambda n: torch.randint(0, self.max_choices, (n,), generator=batch.generator), len(batch.latents))
        images = batch.image_indices.to(self.prompt_choices.device).clamp(max=len(self.prompt_choices) - 1)  # built without captions: one shared row
        rows = self.prompt_choices[images, picks.to(self.prompt_choices.device)].cpu()
        step = denoise(self.backbone, batch.latents, [ids[rows] for ids in self.prompt_ids], batch.generator, batch.time_ids,
                       batch.options, batch.shard)
        loss = diffusion_loss(step, batch.options, batch.masks)
        return loss, {"loss": loss.item()}

    def validation_prompts(self) -> list[str]:
        prompts = []
        for concept in self.concepts:
            token = concept.token
            model_templates = self.backbone.templates.get(self.config.templates)
            if model_templates:  # the model's own vocabulary (Backbone.templates)
                prompts += [model_templates[0].format(token)]
            elif self.config.templates == "style":
                prompts += [f"a painting in the style of {token}", f"a cat in the style of {token}"]
            else:
                prompts += [f"a photo of {token}", f"a photo of {token} on the beach"]
        return prompts

    def vectors(self, concept: int = 0) -> list[torch.Tensor]:
        """A concept's learned vectors, one `[n, d]` tensor per text encoder."""
        return [source().detach().float().cpu().clone() for source in self.sources[concept]]

    def concept_folders(self, output_dir: Path) -> list[Path]:
        """Where each concept's files go: the run folder itself for one concept, else OUTPUT/concepts/<name>/."""
        if len(self.concepts) == 1:
            return [Path(output_dir)]
        return [Path(output_dir) / CONCEPTS_DIR / (c.token.strip("<>") or f"concept{i}") for i, c in enumerate(self.concepts)]

    def save_concept(self, folder: Path, index: int, step: int, name: str) -> list[Path]:
        """One concept's embedding files; `name` is what A1111 and ComfyUI call it (`export.a1111_name`)."""
        return save_embeddings(folder, self.concepts[index].token, self.vectors(index), step=step,
                               model_name=self.backbone.name, name=name)

    def save(self, output_dir: Path, step: int) -> list[Path]:
        # Files other tools see are named after the run, and a run of several concepts adds each concept's name.
        run, folders = run_name(output_dir), self.concept_folders(output_dir)
        files = []
        for index, folder in enumerate(folders):
            files += self.save_concept(folder, index, step, run if len(folders) == 1 else f"{run}-{folder.name}")
        if len(self.lora):
            files += save_lora_files(self.backbone, output_dir, *adapter_layers({"unet": self.backbone.unet}), step=step,
                                     name=run)
        return files + [write_howto(output_dir, files, [c.token for c in self.concepts])]
