"""Peers: our trainers against other projects' trainers, run from their own unmodified source, on the toy world.

For each pair (ours, a peer) both train on the bench's concepts (`world.BENCH_CONCEPTS[:--concepts]`: the 3 held-out
ones by default, up to 12 for the bench's rule; the same five renders per concept the bench's `embeddings` suite uses)
at equal images, steps, batch, learning rate (scaled by the batch in both), resolution and precision, ≥ 3 concepts × 3
seeds; every artefact is drawn by our sampler with the same seeds and read by the toy judge
(`bench.common.measure_embedding`: the all-traits rate of "a <concept>", the six edits of `edit_list` obeyed and
kept), and the rows are compared with the bench's own paired verdicts (`bench.verdicts` -> `bench.stats`). Per run it
also records the wall time per training step (the trainer's own progress bar: loop time / steps), the end-to-end wall
time, the peak RSS of the training process (CPU) and the norm of the learned vector.

Peers are inputs, not code of ours: `--peer NAME=PATH` names the peer's own script in its own checkout and
`--peer-python NAME=PATH` (or one PATH for all) the interpreter of its own virtual environment. The script is read,
the patches its adapter lists are applied (each must match the source exactly, or the run stops naming it), and the
patched copy is written to the work folder (outside this repository) and run there; every row lists the patches
and the SHA-256 of the unpatched source. Nothing of theirs is copied into this repository.

Usage (the issue-25 table; ~1 min per run of ours, ~1.5-2 min per peer run on this 2-core CPU):

    OMP_NUM_THREADS=1 python benchmarks/peers.py --peer diffusers-ti=/work/peers/diffusers/textual_inversion.py \\
        --peer-python /work/peers/venv-diffusers/bin/python [--only ours|diffusers-ti] [--ours-args "--weight-decay 0.01"]
    python benchmarks/peers.py --report benchmarks/results/peers-DATE      # tables + verdicts from rows.jsonl

Runs append to OUTPUT/rows.jsonl as they finish (a row already there is not run again), so two processes
(`--only ours`, `--only diffusers-ti`) can fill one folder side by side, and several of one side share its runs (each
run is claimed first: `claim`); `--report` writes OUTPUT/peers.md.

Peers and how each plugs in (an adapter = patches + a command line + where the artefact lands):

- `diffusers-ti`: diffusers' `examples/textual_inversion/textual_inversion.py` — runs (below).
- `diffusers-dreambooth-lora`: diffusers' `examples/dreambooth/train_dreambooth_lora.py`, against our
  `dreambooth-lora` — runs (below). Its instance prompt is one fixed string: both sides train on "a sks <shape>"
  (`--instance_prompt` / `--instance-prompt`), rank 4, no prior preservation, and every prompt of the judge names the
  concept "sks <shape>". No patch: the toy folder loads as a real one. The toy rate is the bench's sweep's
  (3e-4, scaled by the batch on both sides). Defaults each side keeps (a user's run): theirs clips the gradient norm at
  1.0; ours does not clip; neither flips (ours since its default followed theirs, 2026-12-07: the rows of ours
  measured before, with mirrors, carry the label "[old default: flip]").
- `kohya-ti`, `kohya-lora`: kohya's sd-scripts `train_textual_inversion.py` and `train_network.py` (networks.lora, UNet
  only), against our `textual-inversion` and `dreambooth-lora`: data in a dataset TOML (one caption for all images),
  the tokenizer from `--tokenizer_cache_dir` (filled from the model folder), the rate times the batch (no --scale_lr).
  Unpatched on SD 1.x folders; on the toy model three patches to a copy of its checkout (`Kohya.patches`).
- `batex-official`: the BaTex paper's own `textual_inversion_regression.py` in its era's venv (transformers 4.27,
  diffusers 0.17), against our `batex`: batch 1 × B gradient-accumulation steps (its placeholder lookup is wrong at
  batch > 1), `Vector_dot`, the same M; one patch, the toy templates (`BatexOfficial`).
- `singleinsert-official`: the SingleInsert paper's own `train.py` in its era's venv (diffusers 0.20, transformers 4.39
  with the repository's `modeling_clip.py` in place of transformers' own, as its README says), against our
  `singleinsert`: one render and its mask on a pink background, the paper's schedule on both sides (Stage I 50 × batch
  16, Stage II 100 × batch 4, 1e-4 then half); the judge adds background leakage (`SingleInsertOfficial`).

`--speed MODEL` (no judge): seconds per step at real size, start-up subtracted, repeats interleaved; `--report` adds
its table. `alternatives_table` is the README's summary (benchmarks/tables.py writes it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OURS = "personalize textual-inversion"
METRICS = ("image_alignment", "keeps_background", "edit_keeps_concept", "text_alignment")  # higher is better
COSTS = ("seconds_per_step", "peak_rss_mib")  # lower is better


@dataclass
class Patch:
    """One exact text replacement in a peer's source, with why the peer needs it to run here at all."""

    name: str
    why: str
    old: str
    new: str
    file: str | None = None  # a file of the peer's checkout (relative to the script's folder); None: the script

    def apply(self, source: str, peer: str) -> str:
        if source.count(self.old) != 1:
            raise SystemExit(f"{peer}: patch {self.name!r} does not match its source exactly once; the peer changed, "
                             f"update the adapter (looked for {self.old[:80]!r})")
        return source.replace(self.old, self.new)

    def record(self) -> dict:
        return {"name": self.name, "why": self.why, **({"file": self.file} if self.file else {}),
                "replace": self.old, "with": self.new}


def toy_templates() -> list[str]:
    from personalize.toyworld import TOY_MODEL_DIR

    return json.loads((TOY_MODEL_DIR / "personalize.json").read_text())["prompt_templates"]["object"]


class DiffusersTI:
    """diffusers' examples/textual_inversion/textual_inversion.py, run as its README runs it (accelerate's plain
    single-process launch is `python script.py`)."""

    name = "diffusers-ti"
    ours = OURS
    our_method = "textual-inversion"
    default_lr = 5e-3  # the toy model's TI rate of the README (before scaling by the batch)

    def patches(self) -> list[Patch]:
        templates = toy_templates()
        return [Patch("toy-templates",
                      "the toy model's captions never say 'photo': train on its own template set, as personalize.json "
                      "tells ours (the script's templates are a module-level list, no flag)",
                      "class TextualInversionDataset(Dataset):",
                      f"imagenet_templates_small = {templates!r}  # personalize peers patch: toy templates\n\n\n"
                      "class TextualInversionDataset(Dataset):")]

    def command(self, python: str, script: Path, run: dict) -> list[str]:
        return [python, str(script), "--pretrained_model_name_or_path", run["model"], "--train_data_dir", run["images"],
                "--placeholder_token", run["token"], "--initializer_token", run["init_word"],
                "--resolution", str(run["resolution"]), "--train_batch_size", str(run["batch"]),
                "--max_train_steps", str(run["steps"]), "--learning_rate", str(run["lr"]), "--scale_lr",
                "--lr_scheduler", "constant", "--seed", str(run["seed"]), "--output_dir", run["output"],
                "--mixed_precision", "no", "--dataloader_num_workers", "0", "--checkpointing_steps", str(10**9),
                "--save_steps", str(10**9), "--report_to", "tensorboard"]

    def our_args(self, run: dict) -> list[str]:
        return ["--token", run["token"], "--init-word", run["init_word"]]

    def subject(self, run: dict) -> str:
        return run["token"]

    def artefact(self, folder: Path, run: dict) -> dict:
        return self.our_artefact(folder, run)

    def our_artefact(self, folder: Path, run: dict) -> dict:
        """What the row records of our run's artefact (a peer's may sit in another file: `artefact`)."""
        return {"vector_norm": vector_norm(folder, run["token"])}


class DiffusersDreamBoothLora:
    """diffusers' examples/dreambooth/train_dreambooth_lora.py, as its README runs it (no prior preservation)."""

    name = "diffusers-dreambooth-lora"
    ours = "personalize dreambooth-lora"
    our_method = "dreambooth-lora"
    default_lr = 3e-4  # the bench's swept toy rate for DreamBooth-LoRA (results/toy-2026-11-27/lr-sweep.json)
    rank = 4

    def patches(self) -> list[Patch]:
        return []

    def instance_prompt(self, run: dict) -> str:
        return f"a {self.subject(run)}"

    def command(self, python: str, script: Path, run: dict) -> list[str]:
        return [python, str(script), "--pretrained_model_name_or_path", run["model"], "--instance_data_dir", run["images"],
                "--instance_prompt", self.instance_prompt(run), "--rank", str(self.rank),
                "--resolution", str(run["resolution"]), "--train_batch_size", str(run["batch"]),
                "--max_train_steps", str(run["steps"]), "--learning_rate", str(run["lr"]), "--scale_lr",
                "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", str(run["seed"]),
                "--output_dir", run["output"], "--mixed_precision", "no", "--dataloader_num_workers", "0",
                "--checkpointing_steps", str(10**9), "--report_to", "tensorboard"]

    def our_args(self, run: dict) -> list[str]:
        return ["--token", DREAMBOOTH_TOKEN, "--class-word", run["init_word"], "--instance-prompt", self.instance_prompt(run),
                "--rank", str(self.rank)]

    def subject(self, run: dict) -> str:
        return f"{DREAMBOOTH_TOKEN} {run['init_word']}"

    def artefact(self, folder: Path, run: dict) -> dict:
        return self.our_artefact(folder, run)

    def our_artefact(self, folder: Path, run: dict) -> dict:
        return {"lora_delta_norm": lora_delta_norm(folder / "pytorch_lora_weights.safetensors")}


# kohya's `_load_target_model` (library/train_util.py) turning every UNet into its own SD 1.x class
KOHYA_UNET_CONVERSION = ("        original_unet = UNet2DConditionModel(\n"
                         "            unet.config.sample_size,\n"
                         "            unet.config.attention_head_dim,\n"
                         "            unet.config.cross_attention_dim,\n"
                         "            unet.config.use_linear_projection,\n"
                         "            unet.config.upcast_attention,\n"
                         "        )\n"
                         "        original_unet.load_state_dict(unet.state_dict())\n"
                         "        unet = original_unet\n"
                         "        logger.info(\"U-Net converted to original U-Net\")\n")


class Kohya:
    """kohya-ss/sd-scripts, from its own checkout (copied whole to the work folder, patched there) and venv. Data comes
    in its dataset TOML (one subset: the images, one caption for all, no buckets, no flip: its defaults); its
    tokenizer from `--tokenizer_cache_dir` (it would download openai/clip-vit-large-patch14 otherwise), filled with
    the model folder's own tokenizer. It has no --scale_lr: the rate is passed multiplied by the batch, as ours scales.
    Checkout patches, each only for the toy model (on an SD 1.x-shaped folder such as random:sd15 they change nothing:
    P1's condition holds, P2's attribute exists, P3 reads 0.18215):"""

    copies_checkout = True
    # Its progress bar is no clock: train_network.py and train_textual_inversion.py call `progress_bar.unpause()` after
    # every step, which moves tqdm's start forward by the time since the last redraw, so the bar's elapsed time leaves
    # out most of the loop (300 toy steps read 0-13 s where its own epoch log lines span about 29 s). Its rows' seconds
    # per step are not a measurement: no verdict is drawn on them and the tables leave them out.
    bar_is_a_clock = False

    def patches(self) -> list[Patch]:
        return [
            Patch("keep-diffusers-unet", "kohya rebuilds every UNet as its own SD 1.x class (block channels 320-1280 "
                  "hard-coded): keep diffusers' UNet when the model is not SD 1.x-shaped (same call signature, same "
                  "module class names for its LoRA)",
                  KOHYA_UNET_CONVERSION,
                  "        if tuple(unet.config.block_out_channels) == (320, 640, 1280, 1280) and unet.config.layers_per_block == 2:\n"
                  + textwrap.indent(KOHYA_UNET_CONVERSION, "    ") +
                  "        else:\n"
                  "            logger.info(\"U-Net is not SD 1.x-shaped: keeping diffusers' U-Net\")\n",
                  file="library/train_util.py"),
            Patch("sdpa-on-diffusers-unet", "`--sdpa` calls a method only kohya's UNet has (diffusers' uses torch SDPA already)",
                  "    elif sdpa:\n        logger.info(\"Enable SDPA for U-Net\")\n        unet.set_use_sdpa(True)",
                  "    elif sdpa and hasattr(unet, \"set_use_sdpa\"):\n        logger.info(\"Enable SDPA for U-Net\")\n"
                  "        unet.set_use_sdpa(True)", file="library/train_util.py"),
            Patch("vae-scale-from-config", "the latent scale 0.18215 is hard-coded; the toy VAE's is 0.81 (latents 4.45x too "
                  "small otherwise): read it from the VAE's config", *self.scale_patch),
        ]

    def dataset_toml(self, run: dict, caption: str) -> Path:
        toml = Path(run["output"]) / "dataset.toml"
        toml.write_text("[general]\nenable_bucket = false\nshuffle_caption = false\ncaption_extension = \".none\"\n\n"
                        f"[[datasets]]\nresolution = {run['resolution']}\nbatch_size = {run['batch']}\n\n"
                        f"  [[datasets.subsets]]\n  image_dir = {json.dumps(run['images'])}\n"
                        f"  class_tokens = {json.dumps(caption)}\n  num_repeats = 10\n")
        return toml

    def tokenizer_cache(self, run: dict) -> Path:
        """kohya looks in DIR/openai_clip-vit-large-patch14 before the hub: the model's own tokenizer goes there."""
        import shutil

        cache = Path(run["output"]) / "tokenizer-cache"
        shutil.copytree(Path(run["model"]) / "tokenizer", cache / "openai_clip-vit-large-patch14", dirs_exist_ok=True)
        return cache

    def common(self, python: str, script: Path, run: dict, caption: str) -> list[str]:
        return [python, str(script), "--pretrained_model_name_or_path", run["model"],
                "--tokenizer_cache_dir", str(self.tokenizer_cache(run)), "--dataset_config", str(self.dataset_toml(run, caption)),
                "--output_dir", run["output"], "--output_name", self.output_name, "--save_model_as", "safetensors",
                "--optimizer_type", "AdamW", "--learning_rate", str(run["lr"] * run["batch"]), "--lr_scheduler", "constant",
                "--max_train_steps", str(run["steps"]), "--mixed_precision", "no", "--save_precision", "float", "--sdpa",
                "--seed", str(run["seed"]), "--max_data_loader_n_workers", "0", "--cache_latents"]


class KohyaTI(Kohya, DiffusersTI):
    """kohya's train_textual_inversion.py against our textual-inversion: caption "a <concept>" (the toy template)."""

    name = "kohya-ti"
    output_name = "kohya-ti"
    scale_patch = ("        model_version, text_encoders, vae, unet = self.load_target_model(args, weight_dtype, accelerator)\n",
                   "        model_version, text_encoders, vae, unet = self.load_target_model(args, weight_dtype, accelerator)\n"
                   "        self.vae_scale_factor = getattr(vae.config, \"scaling_factor\", self.vae_scale_factor)\n")
    def command(self, python: str, script: Path, run: dict) -> list[str]:
        return [*self.common(python, script, run, f"a {run['token']}"), "--token_string", run["token"],
                "--init_word", run["init_word"], "--num_vectors_per_token", "1"]

    def artefact(self, folder: Path, run: dict) -> dict:
        from safetensors.torch import load_file

        return {"vector_norm": round(float(load_file(str(self.artefact_file(folder)))["emb_params"].float().norm()), 3)}

    def artefact_file(self, folder: Path) -> Path:
        return folder / f"{self.output_name}.safetensors"


class KohyaLora(Kohya, DiffusersDreamBoothLora):
    """kohya's train_network.py (networks.lora, UNet only, dim = alpha = 4) against our dreambooth-lora, caption
    "a sks <shape>". Its LoRA covers more of each transformer block than ours (projections and feed-forward too):
    its default."""

    name = "kohya-lora"
    output_name = "kohya-lora"
    scale_patch = ("        model_version, text_encoder, vae, unet = self.load_target_model(args, weight_dtype, accelerator)\n",
                   "        model_version, text_encoder, vae, unet = self.load_target_model(args, weight_dtype, accelerator)\n"
                   "        self.vae_scale_factor = getattr(vae.config, \"scaling_factor\", self.vae_scale_factor)\n")
    def command(self, python: str, script: Path, run: dict) -> list[str]:
        return [*self.common(python, script, run, self.instance_prompt(run)), "--network_module", "networks.lora",
                "--network_dim", str(self.rank), "--network_alpha", str(self.rank), "--network_train_unet_only"]

    def artefact(self, folder: Path, run: dict) -> dict:
        return {"lora_delta_norm": lora_delta_norm(self.artefact_file(folder))}

    def artefact_file(self, folder: Path) -> Path:
        return folder / f"{self.output_name}.safetensors"


class BatexOfficial(DiffusersTI):
    """The BaTex paper's own `batex/textual_inversion_regression.py` (studying910/BaTex, a fork of diffusers' TI
    example of early 2023) in its era's venv (transformers 4.27, diffusers 0.17). It is correct at batch 1 only (its
    placeholder position is the row index of the first hit: `bug_demo` in benchmarks/README.md), so it runs as its
    paper's `regression.sh` does: batch 1 × `--gradient_accumulation_steps B`, the same B images per update as our
    batch B; `--scale_lr` multiplies by both, as ours by B. Distance `Vector_dot` (the paper's; its cosine is the
    buggy one), M = `--mask_k`, the same M passed to ours. Same template patch as diffusers' TI example (it keeps that
    script's template list)."""

    name = "batex-official"
    ours = "personalize batex"
    our_method = "batex"
    default_lr = 7e-3  # the bench's swept toy rate for BaTex (results/toy-2026-11-27/lr-sweep.json)
    basis_size = 96  # M: our default round(0.75·d) at the toy model's d = 128 (576 at SD's 768, the paper's)

    def command(self, python: str, script: Path, run: dict) -> list[str]:
        return [python, str(script), "--pretrained_model_name_or_path", run["model"], "--train_data_dir", run["images"],
                "--learnable_property", "object", "--placeholder_token", run["token"],
                "--initializer_token", run["init_word"], "--dist_type", "Vector_dot", "--mask_k", str(self.basis_size),
                "--resolution", str(run["resolution"]), "--train_batch_size", "1",
                "--gradient_accumulation_steps", str(run["batch"]), "--max_train_steps", str(run["steps"]),
                "--learning_rate", str(run["lr"]), "--scale_lr", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
                "--seed", str(run["seed"]), "--output_dir", run["output"], "--only_save_embeds",
                "--mixed_precision", "no", "--dataloader_num_workers", "0", "--checkpointing_steps", str(10**9),
                "--save_steps", str(10**9), "--report_to", "tensorboard"]

    def our_args(self, run: dict) -> list[str]:
        return [*super().our_args(run), "--distance", "dot", "--basis-size", str(self.basis_size)]

    def artefact(self, folder: Path, run: dict) -> dict:
        from personalize.export import load_embedding_file

        return {"vector_norm": round(float(load_embedding_file(self.artefact_file(folder), run["token"])[1][0].norm()), 3)}

    def artefact_file(self, folder: Path) -> Path:
        """torch.save'd {token: [d], weight_vector, candidate_embedding_matrix, vocab_ids}: our loader takes the
        token's tensor."""
        return folder / "learned_embeds.bin"


class SingleInsertOfficial:
    """The SingleInsert paper's own `train.py` (JarrentWu1031/SingleInsert, diffusers 0.20 / transformers 4.39, whose
    `modeling_clip.py` its README replaces with the repository's own so that the text encoder takes `inputs_embeds`),
    against our `singleinsert`, each at the paper's schedule: Stage I 50 iterations at batch 16 (the image encoder
    alone), Stage II 100 at batch 4 (+ rank-4 LoRA on the UNet and the text encoder), rate 1e-4 then half. One
    render with its exact mask on a pink background (the bench's `singleinsert` suite's source), the class word its
    shape; both train on "<concept> <shape>" and are judged on it. Its image encoder is CLIP's ViT-B/32 architecture
    from scratch (its code loads no weights), ours the default small CNN: each side as a user runs it. Two patches:
    the encoder's output width (hard-coded 768, SD 1.5's text width) and the mask's size (hard-coded 64: 512 px
    through SD's 8× VAE)."""

    name = "singleinsert-official"
    ours = "personalize singleinsert"
    our_method = "singleinsert"
    default_lr = 1e-4  # Stage I (the paper's and both codes' default); Stage II at half, both sides
    stages = (50, 16), (100, 4)  # (iterations, batch) of Stage I and II: the paper's
    source_background = "pink"  # the source image's background: "a S" drawn on it is leakage (lower is better)
    copies_checkout = True  # train.py imports its model.py

    def patches(self) -> list[Patch]:
        return [Patch("encoder-width", "the image encoder's output is the placeholder's vector: hard-coded to SD 1.5's "
                                       "text width 768; the text encoder's own width instead (128 on the toy model)",
                      "output_dim=768 # v1-5",
                      "output_dim=text_encoder.config.hidden_size  # personalize peers patch: the model's text width"),
                Patch("mask-size", "the mask is resized to a hard-coded 64, the latent size of 512 px through SD's 8× VAE; "
                                   "the toy model's VAE downsamples 4×, so the latent is resolution / 4",
                      "transforms.Resize(64),",
                      "transforms.Resize(size // 4),  # personalize peers patch: the toy VAE's latent size")]

    def training_set(self, folder: Path, traits: dict) -> tuple[Path, list]:
        """One render (and its mask, NAME.mask.png beside it, as ours reads it; its code reads the mask of the same
        file name from another folder). Written once: its code re-reads the files every step, and two processes
        (`--only`) share the folder."""
        import shutil

        from PIL import Image

        from personalize.toyworld.bench.common import render_set

        images = folder / "single"
        if not images.is_dir():
            scratch = folder / f"render.{os.getpid()}"
            render_set(scratch / "single", 1, seed=2, masks=True, background=self.source_background, size="large",
                       position="center", **traits)
            (scratch / "masks").mkdir()
            shutil.copyfile(scratch / "single" / "000.mask.png", scratch / "masks" / "000.png")
            try:  # renames are atomic: masks first, so a `single` folder always has its masks beside it
                (scratch / "masks").rename(folder / "masks")
                (scratch / "single").rename(images)
            except OSError:  # the other process was first; its files are the same render
                pass
            shutil.rmtree(scratch)
        return images, [Image.open(images / "000.png").convert("RGB")]

    def command(self, python: str, script: Path, run: dict) -> list[str]:
        (s1, b1), (s2, b2) = self.stages
        return [python, str(script), "--pretrained_model_name_or_path", run["model"],
                "--instance_image_dir", run["images"], "--instance_mask_dir", str(Path(run["images"]).parent / "masks"),
                "--instance_name", "000.png", "--class_name", run["init_word"], "--placeholder_token", run["token"],
                "--resolution", str(run["resolution"]), "--s1_train_batch_size", str(b1), "--s2_train_batch_size", str(b2),
                "--s1_train_steps", str(s1), "--s2_train_steps", str(s2), "--s1_learning_rate", str(run["lr"]),
                "--s2_learning_rate", str(run["lr"] / 2), "--rank", "4", "--seed", str(run["seed"]),
                "--output_dir", run["output"], "--mixed_precision", "no", "--checkpointing_steps", str(10**9),
                "--report_to", "tensorboard"]

    def settings(self) -> dict:
        (s1, b1), (s2, b2) = self.stages
        return {"steps": s1 + s2, "batch": f"{b1}/{b2}"}

    def batch_args(self, run: dict) -> list[str]:
        (_, b1), (_, b2) = self.stages
        return ["--stage1-batch-size", str(b1), "--stage2-batch-size", str(b2)]

    def our_args(self, run: dict) -> list[str]:
        (s1, _), (s2, _) = self.stages
        return ["--token", run["token"], "--class-word", run["init_word"], "--stage1-steps", str(s1),
                "--stage2-steps", str(s2), "--stage2-lr", str(run["lr"] / 2)]

    def subject(self, run: dict) -> str:
        return f"{run['token']} {run['init_word']}"

    def our_artefact(self, folder: Path, run: dict) -> dict:
        return {"vector_norm": vector_norm(folder, run["token"]), "lora_delta_norm": lora_delta_norm(folder / "pytorch_lora_weights.safetensors")}

    def artefact(self, folder: Path, run: dict) -> dict:
        from personalize.export import load_embedding_file

        vector = load_embedding_file(folder / "learned_embeds.bin", run["token"])[1][0]
        return {"vector_norm": round(float(vector.norm()), 3),
                "lora_delta_norm": lora_delta_norm(folder / "pytorch_lora_weights.safetensors")}

    def artefact_files(self, folder: Path) -> list[Path]:
        """torch.save'd {token: [d]} and the LoRA in diffusers' pre-PEFT layout (UNet attention processors, text
        encoder `lora_linear_layer`s): our loader reads both."""
        return [folder / "learned_embeds.bin", folder / "pytorch_lora_weights.safetensors"]


def training_set(adapter, folder: Path, traits: dict) -> tuple[Path, list]:
    """The images a pair trains on (both sides) and the references the judge compares with: the `embeddings`
    suite's five renders, or the adapter's own (`training_set`)."""
    from personalize.toyworld.bench.common import render_set

    if hasattr(adapter, "training_set"):
        return adapter.training_set(folder, traits)
    images = folder / "images"
    return images, render_set(images, 5, seed=1, **traits)


def trained_model(cfg, adapter, side: str, out: Path, run: dict):
    """The toy model with a run's artefact installed: our run folder or diffusers' output folder (our loader reads both
    as they are), or the one file a kohya run writes (its TI vector installed under the run's token)."""
    from personalize.generate import install_concept
    from personalize.toyworld.bench.common import load_model

    if side == "ours" or not hasattr(adapter, "artefact_file") and not hasattr(adapter, "artefact_files"):
        return load_model(cfg, [out])
    model = load_model(cfg)
    for file in adapter.artefact_files(out) if hasattr(adapter, "artefact_files") else [adapter.artefact_file(out)]:
        install_concept(model, file, token=run["token"])
    return model


def patched_copy(adapter, script: Path, folder: Path) -> Path:
    """The peer's script with its adapter's patches, in `folder`: the script alone, or (an adapter whose patches touch
    other files of its checkout) the whole checkout; returns the script to run. The source stays untouched."""
    import shutil

    if getattr(adapter, "copies_checkout", False):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(script.parent, folder, ignore=shutil.ignore_patterns(".git", "__pycache__"), symlinks=True)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(script, folder / script.name)
    for patch in adapter.patches():
        target = folder / (patch.file or script.name)
        target.write_text(patch.apply(target.read_text(), adapter.name))
    return folder / script.name


DREAMBOOTH_TOKEN = "sks"  # the DreamBooth paper's rare word, both sides
ADAPTERS = {a.name: a for a in (DiffusersTI(), KohyaTI(), DiffusersDreamBoothLora(), KohyaLora(), BatexOfficial(),
                                 SingleInsertOfficial())}


def our_command(adapter, run: dict, extra: list[str], python: str = sys.executable) -> list[str]:
    return [python, "-c", "import sys; from personalize.cli import main; sys.exit(main(sys.argv[1:]))",
            "train", "--method", adapter.our_method, "--model", run.get("our_model", "toy"), "--images", run["images"],
            "--output", run["output"],
            *adapter.our_args(run), "--resolution", str(run["resolution"]),
            *(adapter.batch_args(run) if hasattr(adapter, "batch_args") else ["--batch-size", str(run["batch"])]), "--steps", str(run["steps"]), "--lr", str(run["lr"]), "--seed", str(run["seed"]),
            "--mixed-precision", "no", "--num-validation-images", "0", "--checkpointing-steps", str(10**9),
            "--overwrite", *extra]


def claim(out: Path) -> bool:
    """Take run `out` for this process (OUT.claim holds its pid): False while a live process holds it, so several
    processes of one side (`--only NAME`, each with OMP_NUM_THREADS=1) share a row's runs. A dead holder's claim is
    taken over."""
    file = out.parent / f"{out.name}.claim"
    file.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(file.read_text() or 0), 0)
            return False  # its holder is alive
        except (ProcessLookupError, ValueError):
            file.write_text(str(os.getpid()))
            return True
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def run_process(argv: list[str], log: Path, steps: int) -> dict:
    """Run one training process; its wall time, the loop's seconds per step (from its progress bar) and peak RSS."""
    start = time.monotonic()
    with open(log, "w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - start
    text = log.read_text(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[:3]} failed; see {log}:\n{text[-3000:]}")
    # tqdm's bar at the end: "300/300 [01:02<00:00, ...]" (elapsed can be h:mm:ss)
    bars = re.findall(rf"\b{steps}/{steps} \[(?:(\d+):)?(\d+):(\d+)<", text)
    loop = None
    if bars:
        h, m, s = bars[-1]
        loop = int(h or 0) * 3600 + int(m) * 60 + int(s)
    return {"wall_seconds": round(wall, 1), "loop_seconds": loop,
            "seconds_per_step": round(loop / steps, 4) if loop else round(wall / steps, 4),
            # CPU seconds (user + system) of the whole process, start-up included: on a shared CPU the wall clock
            # measures the neighbours as much as the trainer, CPU time much less so
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def vector_norm(folder: Path, token: str) -> float:
    from safetensors.torch import load_file

    return round(float(load_file(str(folder / "learned_embeds.safetensors"))[token].float().norm()), 3)


def lora_delta_norm(path: Path) -> float:
    """Frobenius norm of all the LoRA's weight updates together, sqrt(Σ ‖(α/r)·B·A‖²), from a diffusers/PEFT file
    (`….lora_A.weight` / `….lora_B.weight`, `….lora.down.weight` / `….lora.up.weight`; before PEFT `…_lora.down.weight`,
    `…lora_linear_layer.down.weight`) or a kohya file (`….lora_down.weight` / `….lora_up.weight`, `….alpha`)."""
    from safetensors.torch import load_file

    state, total = load_file(str(path)), 0.0
    for key, down in state.items():
        for a, b in ((".lora_A.", ".lora_B."), (".lora.down.", ".lora.up."), (".lora_down.", ".lora_up."),
                     ("_lora.down.", "_lora.up."), ("lora_linear_layer.down.", "lora_linear_layer.up.")):
            if a in key:
                up = state[key.replace(a, b)].float()
                alpha = state.get(key.split(a)[0] + ".alpha")
                scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
                total += float((scale * up.flatten(1) @ down.float().flatten(1)).square().sum())
    return round(total ** 0.5, 4)


def done_keys(rows_file: Path) -> set:
    if not rows_file.is_file():
        return set()
    return {(r["method"], r["concept"], r["seed"]) for r in map(json.loads, rows_file.read_text().splitlines()) if r}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", action="append", default=[], metavar="NAME=PATH", help=f"a peer's script; names: {', '.join(ADAPTERS)}")
    parser.add_argument("--peer-python", action="append", default=[], metavar="[NAME=]PATH",
                        help="the python of the peer's own venv (one PATH for every peer, or NAME=PATH)")
    parser.add_argument("--output", help="results folder (default benchmarks/results/peers-<date>)")
    parser.add_argument("--work", default=os.environ.get("PEERS_WORK", "/tmp/personalize-peers"),
                        help="scratch folder for images, patched peer copies and run folders (outside the repository)")
    parser.add_argument("--concepts", type=int, default=3,
                        help="the first N of the bench's concepts (world.BENCH_CONCEPTS: the 3 held-out first, up to 12)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, help="before scaling by the batch (both sides scale; default: each pair's, "
                        + ", ".join(f"{a.name} {a.default_lr:g}" for a in ADAPTERS.values()) + ")")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--samples", type=int, default=16, help="images of 'a <concept>' per run (sampling seeds 0..n-1)")
    parser.add_argument("--edit-samples", type=int, default=16, help="images per editing prompt")
    parser.add_argument("--only", action="append", default=[], help="run only these rows: 'ours' and/or peer names")
    parser.add_argument("--ours-args", default="", help="extra `personalize train` flags (a hypothesis); the row's label says them")
    parser.add_argument("--base-rates", action="store_true",
                        help="only the base model's own share of samples on each single-image adapter's source background "
                             "for \"a <shape>\" (same sampling seeds as the rows): what background leakage is read against; "
                             "to OUTPUT/base.jsonl")
    parser.add_argument("--timing-only", action="store_true",
                        help="train only (no sampling or judge): rows with the costs alone, to OUTPUT/timing.jsonl")
    parser.add_argument("--report", metavar="OUTPUT", help="only write OUTPUT/peers.md from OUTPUT/rows.jsonl")
    parser.add_argument("--speed", metavar="MODEL", help="no judge: seconds per step on MODEL (e.g. random:sd15) at "
                        "--resolution/--batch, each side trained --steps N and N/3 steps, --repeats times, interleaved; "
                        "to OUTPUT/speed.jsonl")
    parser.add_argument("--repeats", type=int, default=3, help="--speed: runs per side and length (medians)")
    parser.add_argument("--ours-python", default=sys.executable,
                        help="the python that runs ours (--speed: the peer's venv with personalize installed, so both "
                             "sides run on one torch build)")
    args = parser.parse_args(argv)
    if args.report:
        print(report(Path(args.report)))
        return 0

    from personalize.toyworld import TOY_MODEL_DIR
    from personalize.evaluate.toy import background_leakage
    from personalize.toyworld.bench.common import BenchConfig, concept_name, concept_traits, measure_embedding
    from personalize.toyworld.judge import ToyJudge
    from personalize.toyworld.world import BENCH_CONCEPTS

    peers = dict(p.split("=", 1) for p in args.peer)
    unknown = set(peers) - set(ADAPTERS)
    if unknown:
        parser.error(f"unknown peer {', '.join(unknown)}; adapters: {', '.join(ADAPTERS)}")
    pythons = {}
    for item in args.peer_python:
        name, _, path = item.rpartition("=")
        pythons[name or "*"] = path
    output = Path(args.output or REPO / "benchmarks" / "results" / f"peers-{time.strftime('%Y-%m-%d')}")
    work = Path(args.work)
    output.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    rows_file = output / ("timing.jsonl" if args.timing_only else "rows.jsonl")
    extra = shlex.split(args.ours_args)

    # Each peer's patched copy, written once into the work folder.
    scripts, records = {}, {}
    for name, path in peers.items():
        adapter, source_path = ADAPTERS[name], Path(path).resolve()
        if REPO in source_path.parents:
            parser.error(f"{name}: a peer's source must live outside this repository ({source_path})")
        source = source_path.read_text()
        if args.only and name not in args.only:  # another process runs this peer: never touch its patched copy
            continue
        scripts[name] = patched_copy(adapter, source_path, work / "peer-src" / name)
        records[name] = {"source": str(source_path), "source_sha256": hashlib.sha256(source.encode()).hexdigest(),
                         "patches": [p.record() for p in adapter.patches()],
                         "python": pythons.get(name, pythons.get("*", sys.executable))}

    if args.speed:
        speed(args, peers, scripts, records, output, work)
        print(report(output))
        return 0
    cfg = BenchConfig(samples=args.samples, edit_samples=args.edit_samples, model="toy")
    judge = ToyJudge.load()
    if args.base_rates:
        base_rates(cfg, judge, [ADAPTERS[name] for name in peers], args.concepts, output)
        print(report(output))
        return 0
    for seed, concept in [(s, c) for s in range(args.seeds) for c in BENCH_CONCEPTS[: args.concepts]]:  # seed-major: every
        traits, cname = concept_traits(concept), concept_name(concept_traits(concept))  # concept early, for the sign test
        sides = [(adapter, side, label) for adapter in map(ADAPTERS.get, peers)
                 for side, label in (("ours", adapter.ours + (f" [{args.ours_args}]" if extra else "")), (adapter.name, adapter.name))
                 if not args.only or side in args.only]
        for adapter, side, label in sides:
            out = work / cname / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}-{seed}"
            if (label, cname, seed) in done_keys(rows_file) or not claim(out):
                continue  # done, or another process of the same side runs it
            out.mkdir(parents=True, exist_ok=True)
            images, references = training_set(adapter, work / cname, traits)
            run = {"model": str(TOY_MODEL_DIR), "images": str(images), "output": str(out), "token": "<concept>",
                   "init_word": traits["shape"], "resolution": args.resolution, "batch": args.batch,
                   "steps": args.steps, "lr": args.lr or adapter.default_lr, "seed": seed,
                   **(adapter.settings() if hasattr(adapter, "settings") else {})}  # a method's own schedule
            if side == "ours":
                argv, record = our_command(adapter, run, extra, args.ours_python), {"ours_args": args.ours_args}
            else:
                argv, record = adapter.command(records[side]["python"], scripts[side], run), records[side]
            cost = run_process(argv, out.parent / f"{out.name}.log", run["steps"])
            plain = []  # the "a S" images
            measured = {} if args.timing_only else measure_embedding(
                cfg, trained_model(cfg, adapter, side, out, run), judge, adapter.subject(run), traits, references,
                grid=out / "a_concept.png", plain=plain)
            if plain and getattr(adapter, "source_background", None):
                measured["background_leakage"] = background_leakage(judge.predict(plain), adapter.source_background)
            row = {"suite": "peers", "method": label, "side": side, "pair": adapter.name, "concept": cname, "seed": seed,
                   **{k: v for k, v in run.items() if k in ("steps", "batch", "lr", "resolution", "init_word")},
                   "subject": adapter.subject(run), "precision": "fp32", "device": "cpu", **cost,
                   **(adapter.our_artefact if side == "ours" else adapter.artefact)(out, run), **measured, **record,
                   "command": argv[3:] if side == "ours" else argv[1:]}
            with open(rows_file, "a") as f:
                f.write(json.dumps(row) + "\n")
            (out.parent / f"{out.name}.claim").unlink()
            print(json.dumps({k: row.get(k) for k in ("method", "concept", "seed", "image_alignment", "keeps_background",
                                                      "text_alignment", "seconds_per_step", "cpu_seconds", "vector_norm",
                                                      "lora_delta_norm")}),
                  flush=True)
    print(report(output))
    return 0


def base_rates(cfg, judge, adapters: list, concepts: int, output: Path) -> None:
    """The base model, no concept: the share of its "a <shape>" samples (the rows' sampling seeds) on each source
    background. The prompt names no background, so the model picks one, the source's among them: a row's leakage is
    read against this, not against 0."""
    from personalize.evaluate.toy import background_leakage
    from personalize.toyworld.bench.common import Sampler, concept_name, concept_traits, load_model
    from personalize.toyworld.world import BENCH_CONCEPTS

    model, sample, rows = load_model(cfg), Sampler(cfg), []
    for background in dict.fromkeys(a.source_background for a in adapters if getattr(a, "source_background", None)):
        for concept in BENCH_CONCEPTS[:concepts]:
            traits = concept_traits(concept)
            readings = judge.predict(sample(model, f"a {traits['shape']}", cfg.samples))
            rows.append({"concept": concept_name(traits), "prompt": f"a {traits['shape']}", "samples": cfg.samples,
                         "background": background, "share": background_leakage(readings, background)})
    (output / "base.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_base(output: Path) -> list[dict]:
    file = output / "base.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines() if line] if file.is_file() else []


def base_table(rows: list[dict]) -> str:
    """The base model's share of samples on the source background, per concept (`--base-rates`)."""
    lines = ["| concept | prompt (base model, no concept) | samples | source background | share on it |", "|---|---|---|---|---|"]
    lines += [f"| {r['concept']} | \"{r['prompt']}\" | {r['samples']} | {r['background']} | {r['share']:.2f} |" for r in rows]
    if rows:
        lines.append(f"| mean | | | | {statistics.mean(r['share'] for r in rows):.3f} |")
    return "\n".join(lines)


def speed(args, peers: dict, scripts: dict, records: dict, output: Path, work: Path) -> None:
    """Seconds per step at real size, start-up subtracted: each side trains N and N/3 steps (a fresh process each);
    (T(N) − T(N/3)) / (N − N/3) of wall time and of CPU time. Runs are interleaved (repeat-major, sides and lengths
    alternating) so a change of the machine's load falls on every side alike. Rows to OUTPUT/speed.jsonl."""
    from personalize.backbone import load_backbone  # noqa: F401 - fails early when ours is not installed
    from personalize.architectures import is_random_model, random_model_folder
    from personalize.toyworld.bench.common import render_set

    model = str(random_model_folder(args.speed)) if is_random_model(args.speed) else args.speed
    images = work / "speed" / "images"
    render_set(images, 5, seed=1, colour="blue", shape="star", pattern="striped")
    rows_file, extra = output / "speed.jsonl", shlex.split(args.ours_args)
    lengths = (args.steps, max(1, args.steps // 3))
    import torch

    done = [json.loads(line)["repeat"] for line in rows_file.read_text().splitlines() if line] if rows_file.is_file() else []
    first = max(done, default=-1) + 1  # a second call adds repeats to the same rows (e.g. `--only` the close pairs)
    for repeat in range(first, first + args.repeats):
        ran = set()  # ours once per repeat, though two peers (diffusers', kohya's) pair with it
        for adapter in map(ADAPTERS.get, peers):
            for side, label in (("ours", adapter.ours), (adapter.name, adapter.name)):
                if (args.only and side not in args.only) or label in ran:
                    continue
                ran.add(label)
                for steps in lengths:
                    out = work / "speed" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}-{steps}-{repeat}"
                    out.mkdir(parents=True, exist_ok=True)
                    run = {"model": model, "our_model": model, "images": str(images), "output": str(out),
                           "token": "<concept>", "init_word": "star", "resolution": args.resolution, "batch": args.batch,
                           "steps": steps, "lr": args.lr or adapter.default_lr, "seed": 0}
                    argv = (our_command(adapter, run, extra, args.ours_python) if side == "ours"
                            else adapter.command(records[side]["python"], scripts[side], run))
                    cost = run_process(argv, out.parent / f"{out.name}.log", steps)
                    row = {"suite": "peers speed", "method": label, "side": side, "pair": adapter.name, "model": args.speed,
                           "repeat": repeat, "steps": steps, "batch": args.batch, "resolution": args.resolution,
                           "threads": int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())),
                           **cost, "python": argv[0], "command": argv[1:]}
                    with open(rows_file, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps({k: row[k] for k in ("method", "steps", "repeat", "wall_seconds", "cpu_seconds",
                                                          "peak_rss_mib")}), flush=True)


def read_speed(output: Path) -> list[dict]:
    file = output / "speed.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines() if line] if file.is_file() else []


def speed_table(rows: list[dict]) -> str:
    """Per trainer: seconds per step with start-up subtracted, median over repeats [min, max], wall and CPU, and the
    median peak RSS of the longer runs; the ratio to ours of the same pair."""
    n, short = max(r["steps"] for r in rows), min(r["steps"] for r in rows)
    per = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        pairs = [(a, b) for a in mine if a["steps"] == n for b in mine if b["steps"] == short and b["repeat"] == a["repeat"]]
        wall = [(a["wall_seconds"] - b["wall_seconds"]) / (n - short) for a, b in pairs]
        cpu = [(a["cpu_seconds"] - b["cpu_seconds"]) / (n - short) for a, b in pairs]
        per[method] = (wall, cpu, [a["peak_rss_mib"] for a, _ in pairs], mine[0]["pair"], mine[0]["side"])
    lines = [f"| trainer | repeats | wall s/step (median [min, max]) | CPU s/step | × ours (wall) | peak RSS GiB ({n} steps) |",
             "|---|---|---|---|---|---|"]
    for method, (wall, cpu, rss, pair, side) in per.items():
        ours = per.get(ADAPTERS[pair].ours, [None])[0] if pair in ADAPTERS else None  # the row its peer is paired with
        ratio = f"{statistics.median(wall) / statistics.median(ours):.2f}" if ours and wall else "—"
        lines.append(f"| {method} | {len(wall)} | {statistics.median(wall):.2f} [{min(wall):.2f}, {max(wall):.2f}] | "
                     f"{statistics.median(cpu):.2f} | {ratio} | {statistics.median(rss) / 1024:.2f} |")
    return "\n".join(lines)


SOURCE_NAMES = {"diffusers-ti": "diffusers `examples/textual_inversion/textual_inversion.py`",
                "kohya-ti": "kohya sd-scripts `train_textual_inversion.py`",
                "diffusers-dreambooth-lora": "diffusers `examples/dreambooth/train_dreambooth_lora.py`",
                "kohya-lora": "kohya sd-scripts `train_network.py` (LoRA)",
                "batex-official": "the BaTex paper's code (`textual_inversion_regression.py`)",
                "singleinsert-official": "the SingleInsert paper's code (`train.py`)"}


def alternatives_table(outputs: list[Path], link: str) -> str:
    """The README's summary, one line per peer: quality on the toy world (ours vs theirs, concept-level verdict) and
    cost at real size (median wall seconds per step, × ours, peak RSS); each cell from the raw rows, `link` the
    benchmarks/README.md section they are tabulated in. Verdicts are Holm-corrected over the pair's claims, as in its
    verdict table. A pair's quality comes from the last of `outputs` (results folders, oldest first) that holds both
    of its sides: a later run on more concepts replaces an earlier one, never joins it (rows of different days are
    never paired)."""
    from personalize.toyworld.bench import verdicts

    speed = [s for output in outputs for s in read_speed(output)]
    rows_by_pair = {}
    for output in outputs:
        rows = read_rows(output)
        for name, adapter in ADAPTERS.items():
            pair_rows = rows_of(rows, name)
            if {r["method"] for r in pair_rows} >= {adapter.ours, name}:
                rows_by_pair[name] = pair_rows
    per_step = {}
    for line in speed_table(speed).splitlines()[2:] if speed else []:
        cells = [c.strip() for c in line.strip("|").split("|")]
        per_step[cells[0]] = (float(cells[2].split()[0]), cells[4], float(cells[5]))
    lines = ["| instead of | ours | \"a S\" drawn with all its traits (toy, ours vs theirs) | edits keep the concept "
             "| s/step, SD 1.5 size, 128 px, CPU: ours vs theirs (theirs ÷ ours) | peak RSS GiB, ours vs theirs |",
             "|---|---|---|---|---|---|"]
    for name, adapter in ADAPTERS.items():
        quality = []
        mine = [r for r in rows_by_pair.get(name, []) if r["method"] in (adapter.ours, name)]
        if {r["method"] for r in mine} == {adapter.ours, name}:
            decided = {c["metric"]: c for c in verdicts(mine, pair_claims(mine))}  # Holm over the pair's claims, as its table
            for metric in ("image_alignment", "edit_keeps_concept"):
                c = decided[metric]
                a = statistics.mean(r[metric] for r in mine if r["method"] == adapter.ours)
                b = statistics.mean(r[metric] for r in mine if r["method"] == name)
                quality.append(f"[{a:.2f} vs {b:.2f}]({link}) ({c['concepts']} concepts, {c['runs_a']} + "
                               f"{c['runs_b']} runs: {c['verdict']})")
        else:
            quality = ["not run on the toy model (see the peers section)"] * 2
        if name in per_step and adapter.ours in per_step:
            (o, _, o_rss), (t, ratio, t_rss) = per_step[adapter.ours], per_step[name]
            cost = [f"[{o:.2f} vs {t:.2f} ({ratio}×)]({link})", f"{o_rss:.1f} vs {t_rss:.1f}"]
        else:
            cost = ["not measured", "—"]
        lines.append(f"| {SOURCE_NAMES[name]} | `--method {adapter.our_method}` | {' | '.join(quality)} | {' | '.join(cost)} |")
    return "\n".join(lines)


def pair_claims(rows: list[dict]) -> list[tuple]:
    """Each peer against its counterpart (rows with --ours-args are hypotheses: tabulated, never a claim)."""
    claims = []
    for pair in dict.fromkeys(map(pair_of, rows)):
        methods, ours = {r["method"] for r in rows_of(rows, pair)}, ADAPTERS[pair].ours
        if {ours, pair} <= methods:
            claims += [("peers", metric, ours, pair, True) for metric in METRICS]
            claims += [("peers", metric, ours, pair, False) for metric in COSTS if timed(pair, metric)]
            if getattr(ADAPTERS[pair], "source_background", None):  # a single-image method: leakage, lower is better
                claims.append(("peers", "background_leakage", ours, pair, False))
    return claims


def timed(method: str, metric: str) -> bool:
    """Whether a row of `method` (a peer's name, or ours) measured `metric`: not seconds per step where the peer's
    progress bar is no clock (`Kohya.bar_is_a_clock`)."""
    return metric != "seconds_per_step" or getattr(ADAPTERS.get(method), "bar_is_a_clock", True)


def verdict_table(rows: list[dict]) -> str:
    """The bench's paired verdicts of every pair (A = ours), Holm within each pair's claims."""
    from personalize.toyworld.bench import CLAIM_HEADER, format_claim, verdicts

    lines = ["| " + " | ".join(CLAIM_HEADER) + " |", "|---" * len(CLAIM_HEADER) + "|"]
    for pair in dict.fromkeys(map(pair_of, rows)):
        mine = rows_of(rows, pair)
        lines += ["| " + " | ".join([c["claim"], *format_claim(c)]) + " |" for c in verdicts(mine, pair_claims(mine))]
    return "\n".join(lines)


def means_table(rows: list[dict], pairs: list[str]) -> str:
    """Each row of each pair, hypotheses included, as the verdicts read it: the mean over concepts of each concept's
    mean (so a hypothesis run on the same concepts and seeds compares with its neighbours line by line)."""
    lines = ["| pair | row | concepts | runs | " + " | ".join(METRICS) + " |", "|---" * (4 + len(METRICS)) + "|"]
    for pair in pairs:
        mine = rows_of(rows, pair)
        for method in dict.fromkeys(r["method"] for r in mine):
            runs = [r for r in mine if r["method"] == method]
            concepts = list(dict.fromkeys(r["concept"] for r in runs))
            means = [statistics.mean(statistics.mean(r[m] for r in runs if r["concept"] == c) for c in concepts) for m in METRICS]
            lines.append(f"| {pair} | {method} | {len(concepts)} | {len(runs)} | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    return "\n".join(lines)


def pair_of(row: dict) -> str:
    """The peer a row belongs with: its own `pair`, or (rows written before pairs were recorded) its method's."""
    return row.get("pair") or next(a.name for a in ADAPTERS.values() if row["method"] == a.name or row["method"].startswith(a.ours))


def read_rows(output: Path, pair: str | None = None) -> list[dict]:
    file = output / "rows.jsonl"
    rows = [json.loads(line) for line in file.read_text().splitlines() if line] if file.is_file() else []
    return rows if pair is None else rows_of(rows, pair)


SETTINGS = ("steps", "batch", "lr", "resolution")


def rows_of(rows: list[dict], pair: str) -> list[dict]:
    """A pair's rows: the peer's, its hypotheses', and our plain rows of its method, whichever pair they were run
    with (one run of ours per concept and seed serves every peer of that method) — if they ran at the peer's
    settings."""
    ours = ADAPTERS[pair].ours
    theirs = {tuple(r.get(k) for k in SETTINGS) for r in rows if r["method"] == pair}
    return [r for r in rows if pair_of(r) == pair
            or (r["method"] == ours and (not theirs or tuple(r.get(k) for k in SETTINGS) in theirs))]


def _norm(row: dict) -> tuple[str, float]:
    """What the artefact's size is read as: the learned vector's norm, or the LoRA's whole update ‖ΔW‖."""
    return ("‖v‖", row["vector_norm"]) if "vector_norm" in row else ("‖ΔW‖", row["lora_delta_norm"])


def per_run_table(rows: list[dict]) -> str:
    """One line per concept and seed, one cell per row (method): "a S" all traits / on black, all traits and black /
    seconds per step / the artefact's norm; "—" where that run is missing. benchmarks/tables.py puts it in the
    README."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    norms = {m: _norm(next(r for r in rows if r["method"] == m))[0] for m in methods}
    leak = all("background_leakage" in r for r in rows)  # a single-image pair: "a S" on the source's background
    lines = ["| concept | seed | " + " | ".join(f"{m}: a S / black bg /{' leakage /' if leak else ''} s/step / {norms[m]}"
                                             for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for concept in dict.fromkeys(r["concept"] for r in rows):
        for seed in sorted({r["seed"] for r in rows if r["concept"] == concept}):
            cells = []
            for m in methods:
                r = next((r for r in rows if (r["method"], r["concept"], r["seed"]) == (m, concept, seed)), None)
                cells.append("—" if r is None else f"{r['image_alignment']:.2f} / {r['keeps_background']:.2f} / "
                             + (f"{r['background_leakage']:.2f} / " if leak else "")
                             + (f"{r['seconds_per_step']:.3f}" if timed(m, "seconds_per_step") else "n/a") + f" / {_norm(r)[1]:.2f}")
            lines.append(f"| {concept} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(output: Path) -> str:
    """OUTPUT/peers.md: per pair (ours, a peer), per concept and seed, mean ± std per row, and the bench's paired
    verdicts (Holm within each pair's claims)."""
    from personalize.toyworld.bench.common import summarise

    lines = [f"# peers ({output.name})"]
    keep = ("image_alignment", "keeps_background", "edit_background", "text_alignment", "edit_keeps_concept", "background_leakage",
            "seconds_per_step", "wall_seconds", "peak_rss_mib", "vector_norm", "lora_delta_norm")
    all_rows = read_rows(output)
    for pair in dict.fromkeys(map(pair_of, all_rows)):
        rows, adapter = rows_of(all_rows, pair), ADAPTERS[pair]
        lines += ["", f"## {adapter.ours} vs {pair}", "", "### per concept and seed", "", per_run_table(rows)]
        lines += ["", "### means", summarise([{k: v for k, v in r.items() if k in keep and timed(r["method"], k)
                                               or k in ("suite", "method", "concept", "seed")}
                                              for r in rows])]
        if pair_claims(rows):
            lines += ["### paired verdicts (A = ours; the bench's rule: concept means, sign test over concepts, Holm)", "",
                      verdict_table(rows)]
    if read_speed(output):
        rows = read_speed(output)
        first = rows[0]
        lines += ["", f"## speed at real size ({first['model']}, {first['resolution']} px, batch {first['batch']}, "
                      f"{first['threads']} threads; `--speed`)", "", speed_table(rows)]
    if read_base(output):
        lines += ["", "## the base model's own rate of the source background (`--base-rates`)", "", base_table(read_base(output))]
    timing_file = output / "timing.jsonl"
    if timing_file.is_file():  # --timing-only rows: the same runs without the judge, run one at a time
        timing = [json.loads(line) for line in timing_file.read_text().splitlines() if line]
        lines += ["", "## timing (--timing-only runs)", summarise(
            [{**{k: r[k] for k in ("method", "concept", "seed", "steps") if k in r}, "suite": "peers timing",
              **{k: r[k] for k in ("seconds_per_step", "cpu_seconds", "wall_seconds", "peak_rss_mib") if k in r}}
             for r in timing])]
    patches = {json.dumps(r.get("patches")): r["method"] for r in all_rows if r.get("patches")}
    for text, method in patches.items():
        lines += ["", f"patches applied to {method}:"] + [f"- `{p['name']}`: {p['why']}" for p in json.loads(text)]
    md = "\n".join(lines) + "\n"
    (output / "peers.md").write_text(md)
    return md


if __name__ == "__main__":
    sys.exit(main())
