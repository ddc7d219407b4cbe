"""`lr-sweep`: three learning rates per method on a concept no table uses (purple dotted cross, a combination the
model can name), so that no method loses a table for a badly chosen rate. The rule, fixed before looking: the
rate with the best image alignment (all three traits in "a S") at the suite's steps, ties broken by the better
text alignment. The chosen rates are written to bench.json (`chosen_rates`); `--rates bench.json` uses them."""

from __future__ import annotations

from pathlib import Path

from .common import LOG, BenchConfig, load_model, measure_embedding, render_set, select_runs, subject_of, train_run

SWEEP_TRAITS = {"colour": "purple", "shape": "cross", "pattern": "dotted"}
SWEEP = {  # three rates around each method's toy default (×1/3, ×1, ×3), before the batch-size scaling
    "textual-inversion": (1.7e-3, 5e-3, 1.5e-2),
    "batex": (7e-3, 2e-2, 6e-2),
    "dreambooth-lora": (3e-5, 1e-4, 3e-4),
    "singleinsert": (3e-5, 1e-4, 3e-4),
}


def suite_lr_sweep(cfg: BenchConfig, judge, work: Path) -> tuple[list[dict], dict[str, float]]:
    from ...methods import BatexConfig, DreamBoothLoraConfig, SingleInsertConfig, TextualInversionConfig

    shape = SWEEP_TRAITS["shape"]
    folder = work / "sweep" / "images"
    references = render_set(folder, 5, seed=11, masks=True, **SWEEP_TRAITS)
    single = work / "sweep" / "single"
    render_set(single, 1, seed=12, masks=True, background="pink", size="large", position="center", **SWEEP_TRAITS)
    configs = {"textual-inversion": TextualInversionConfig(init_word=shape), "batex": BatexConfig(init_word=shape),
               "dreambooth-lora": DreamBoothLoraConfig(class_word=shape), "singleinsert": SingleInsertConfig(class_word=shape)}
    rows, chosen = [], {}
    for method, rates in SWEEP.items():
        if not select_runs(cfg, "lr-sweep", [(method,)]):
            continue
        results = []
        for rate in rates:
            method_cfg = configs[method]
            steps = 300 if cfg.steps is None else cfg.steps
            if method == "singleinsert":
                steps = method_cfg.stage1_steps + method_cfg.stage2_steps
            out = work / "sweep" / f"{method}-{rate:g}"
            seconds = train_run(cfg, out, method, method_cfg, single if method == "singleinsert" else folder, steps, 0,
                                lr=rate, batch_size=None if method == "singleinsert" else 4)
            row = {"suite": "lr-sweep", "method": method, "concept": "purple-cross-dotted", "seed": 0, "lr": rate,
                   "train_seconds": seconds,
                   **measure_embedding(cfg, load_model(cfg, [out]), judge, subject_of(method, method_cfg), SWEEP_TRAITS, references)}
            rows.append(row)
            results.append(row)
            LOG.info("%s", row)
        best = max(results, key=lambda r: (r["image_alignment"], r["text_alignment"]))
        chosen[method] = best["lr"]
    if "dreambooth-lora" in chosen:
        chosen["dis2booth"] = chosen["dreambooth-lora"]  # the same LoRA at the same rate; its own sweep would cost 12× more
    return rows, chosen
