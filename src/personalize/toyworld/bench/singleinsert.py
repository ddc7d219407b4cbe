"""SingleInsert's claims in miniature (Tables 1-3): one render with its exact mask on a pink background.

Rows: Textual Inversion and TI+LoRA (the paper's "TI+DB") on it, SingleInsert's loss ablation (baseline = plain
reconstruction; + L_fg; + L_bg; + L_sm = full), Stage I only, and the official code's semantic reference (LoRA
text encoder). Columns: foreground alignment (the concept drawn by "a S"), background leakage (share of samples
on the source's pink), clean foreground (the concept on another background), text alignment and edit-keeps-concept
over the six edits of `common.edit_list`, diversity (judge features), toy ESR. Then composition: two concepts
trained apart, drawn together ("a S1 next to a S2"). The paper's Table 3 compares a pretrained CLIP ViT-B/32 with a
pretrained CNN; no pretrained weights exist here, so its row compares the two architectures the method supports,
both from scratch: the default CNN and a toy-size CLIP vision transformer (`VIT_ENCODER`, same random init for
every run), each through the same full method.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ...evaluate import toy as T
from ...evaluate.esr import editing_success_rate
from ...evaluate.protocols import TOY_ESR
from ..judge import pair_shows
from ..world import BENCH_CONCEPTS, HELD_OUT
from .common import (LOG, BenchConfig, Sampler, TI_LORA_LR, chosen_concepts, concept_name, concept_traits, load_model, measure_embedding,
                     method_rate, render_set, run_seeds, run_slug, save_grid, select_runs, subject_of, train_run)

SOURCE_BACKGROUND = "pink"  # a background no edit prompt asks for
VIT_ROW = "singleinsert: full, ViT encoder (from scratch)"
# A CLIP vision transformer of the toy model's size (about the CNN's 1 M parameters): 64 px, 8 px patches, 4 layers.
VIT_ENCODER = dict(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=4, projection_dim=128)
COMPOSED = ("singleinsert: full (+L_sm)", "textual-inversion (1 image)", "textual-inversion + LoRA (1 image)")


def vit_encoder(folder: Path) -> Path:
    """A toy-size CLIP vision tower with a fixed random init, saved once where `--encoder-weights` can load it."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        CLIPVisionModel(CLIPVisionConfig(**VIT_ENCODER)).save_pretrained(folder)
    return folder


def _runs(cfg: BenchConfig, traits: dict, token: str, work: Path) -> list[tuple]:
    from ...methods import SingleInsertConfig, TextualInversionConfig

    full = dict(fg_loss=True, bg_weight=1.0, sm_weight=1.0)
    variants = [
        ("singleinsert: baseline", dict(fg_loss=False, bg_weight=0.0, sm_weight=0.0)),
        ("singleinsert: +L_fg", dict(fg_loss=True, bg_weight=0.0, sm_weight=0.0)),
        ("singleinsert: +L_fg +L_bg", dict(fg_loss=True, bg_weight=1.0, sm_weight=0.0)),
        ("singleinsert: full (+L_sm)", full),
        ("singleinsert: stage I only", {**full, "stage2_steps": 0}),
        ("singleinsert: official semantic reference", {**full, "semantic_reference": "lora-text-encoder"}),
        (VIT_ROW, {**full, "encoder": "clip-vit", "encoder_weights": str(work / "vit-encoder")}),  # Table 3
    ]
    runs = [("textual-inversion (1 image)", "textual-inversion", TextualInversionConfig(token=token, init_word=traits["shape"])),
            ("textual-inversion + LoRA (1 image)", "textual-inversion",
             TextualInversionConfig(token=token, init_word=traits["shape"], lora_rank=4, lora_lr=TI_LORA_LR))]
    for label, flags in variants:
        si = SingleInsertConfig(token=token, class_word=traits["shape"], **flags)
        if cfg.steps and si.stage2_steps:  # --steps sets the total; Stage I keeps the paper's 50
            si.stage2_steps = max(1, cfg.steps - si.stage1_steps)
        runs.append((label, "singleinsert", si))
    chosen = select_runs(cfg, "singleinsert", runs)
    if any(label == VIT_ROW for label, *_ in chosen):
        vit_encoder(work / "vit-encoder")
    return chosen


def suite_singleinsert(cfg: BenchConfig, judge, work: Path) -> list[dict]:
    sample, rows, runs_of = Sampler(cfg), [], {}
    for index, concept in chosen_concepts(cfg, BENCH_CONCEPTS):
        traits, name = concept_traits(concept), concept_name(concept_traits(concept))
        token = f"<c{index}>"  # a token per concept: two concepts trained apart meet in one prompt below
        folder = work / name / "single"
        source = render_set(folder, 1, seed=2, masks=True, background=SOURCE_BACKGROUND, size="large",
                            position="center", **traits)
        for label, method, method_cfg in _runs(cfg, traits, token, work):
            for seed in run_seeds(cfg):
                out = work / name / f"{run_slug(label)}-{seed}"
                steps = (method_cfg.stage1_steps + method_cfg.stage2_steps if method == "singleinsert"
                         else 300 if cfg.steps is None else cfg.steps)
                subject = subject_of(method, method_cfg)
                seconds = train_run(cfg, out, method, method_cfg, folder, steps, seed, lr=method_rate(cfg, method),
                                    batch_size=None if method == "singleinsert" else 4)
                runs_of[(label, index, seed)] = (out, subject, traits)
                backbone, images = load_model(cfg, [out]), []
                edits = measure_embedding(cfg, backbone, judge, subject, traits, source,
                                          Path(cfg.output) / "grids" / f"singleinsert-{name}-{out.name}.png", images)
                readings = judge.predict(images)
                row = {"suite": "singleinsert", "method": label, "concept": name, "held_out": concept in HELD_OUT, "seed": seed,
                       "train_seconds": seconds,
                       "foreground_alignment": T.concept_rate(readings, traits),
                       "feature_similarity": T.feature_similarity(judge, images, source),
                       "background_leakage": T.background_leakage(readings, SOURCE_BACKGROUND),
                       "clean_foreground": T.clean_foreground_rate(readings, traits, SOURCE_BACKGROUND),
                       "text_alignment": edits["text_alignment"], "edit_keeps_concept": edits["edit_keeps_concept"],
                       **{k: v for k, v in edits.items() if k.startswith(("edit_", "keeps_")) and k != "edit_keeps_concept"},
                       "diversity": T.diversity(judge, images)}
                if cfg.esr:
                    esr_images = {p.template: sample(backbone, p.template.format(subject), cfg.edit_samples) for p in TOY_ESR}
                    row["esr"] = editing_success_rate(esr_images, list(TOY_ESR), judge).overall
                rows.append(row)
                LOG.info("%s", row)
    rows += _compositions(cfg, judge, runs_of)
    return rows


def composition_pairs(indices: list[int]) -> list[tuple[int, int]]:
    """Each concept with the next one round a ring: n pairs for n ≥ 3 concepts, every concept in two of them (on 3
    concepts (0, 1), (1, 2), (0, 2), the pairs the 2.1 rows were measured on); the lower index is named first."""
    if len(indices) < 3:  # a ring of two is one pair; of one, none
        return [tuple(indices)] if len(indices) == 2 else []
    return [tuple(sorted((a, b))) for a, b in zip(indices, indices[1:] + indices[:1])]


def _compositions(cfg: BenchConfig, judge, runs_of: dict) -> list[dict]:
    """Two single-image concepts trained apart, loaded together: "a S1 next to a S2" must show both."""
    rows, sample = [], Sampler(cfg)
    trained = sorted({index for _, index, _ in runs_of})
    for label in COMPOSED:
        for seed in run_seeds(cfg):
            for a, b in composition_pairs(trained):
                if (label, a, seed) not in runs_of or (label, b, seed) not in runs_of:
                    continue
                (out_a, subject_a, traits_a), (out_b, subject_b, traits_b) = runs_of[(label, a, seed)], runs_of[(label, b, seed)]
                backbone = load_model(cfg, [out_a, out_b])
                images = sample(backbone, f"a {subject_a} next to a {subject_b}", cfg.edit_samples)
                save_grid(images, Path(cfg.output) / "grids" / f"singleinsert-composition-{run_slug(label)}-{a}+{b}-{seed}.png")
                readings = judge.predict(images)
                rows.append({"suite": "singleinsert-composition", "method": label, "concept": f"{a}+{b}", "seed": seed,
                             "both_drawn": statistics.mean(pair_shows(r, traits_a, traits_b) for r in readings),
                             "two_objects": statistics.mean(r["objects"] == "two" for r in readings)})
    return rows
