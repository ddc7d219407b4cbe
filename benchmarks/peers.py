"""Peers: our trainers against other projects' trainers, run from their own unmodified source, on the toy world.

For each pair (ours, a peer) both train on the toy world's held-out concepts (`world.HELD_OUT`, the same five
renders per concept the bench's `embeddings` suite uses) at equal images, steps, batch, learning rate (scaled by the
batch in both), resolution and precision, ≥ 3 concepts × 3 seeds; every artefact is drawn by our sampler with the
same seeds and read by the toy judge (`bench.common.measure_embedding`: the all-traits rate of "a <concept>", the six
edits of `edit_list` obeyed and kept), and the rows are compared with the bench's own paired verdicts
(`bench.verdicts` -> `bench.stats`). Per run it also records the wall time per training step (the trainer's own
progress bar: loop time / steps), the end-to-end wall time, the peak RSS of the training process (CPU) and the norm
of the learned vector.

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
(`--only ours`, `--only diffusers-ti`) can fill one folder side by side; `--report` writes OUTPUT/peers.md.

Peers and how each plugs in (an adapter = patches + a command line + where the artefact lands):

- `diffusers-ti`: diffusers' `examples/textual_inversion/textual_inversion.py` — runs (below).
- `diffusers-dreambooth-lora` (`examples/dreambooth/train_dreambooth_lora.py`), against our `dreambooth-lora`: would
  plug in the same way (flags `--instance_prompt "a <concept> <class>"`, `--rank 4`, no prior preservation); its
  artefact `pytorch_lora_weights.safetensors` is what our `generate` loads. Not run yet: its instance prompt is one
  fixed string, not our toy templates (a patch or an equal fixed prompt on our side), and its `--resolution`
  transforms differ (Resize + CenterCrop/RandomCrop on every step) — an adapter has to say which.
- kohya `sd-scripts` (`train_network.py` LoRA, `train_textual_inversion.py`): needs a model in one `.safetensors`
  checkpoint (our `export` can write the toy model as one) and its dataset TOML; its own pinned torch/diffusers
  (diffusers 0.25 era) need their own venv. Not run: no venv built for it yet.
- BaTex / SingleInsert official code: research repositories built on old `ldm` / diffusers forks, SD 1.x weights
  names hard-coded, and (SingleInsert) a CLIP image encoder downloaded from a hub at run time, which this machine
  cannot reach; they would need patches far beyond "run at all". Listed, not run.
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

    def apply(self, source: str, peer: str) -> str:
        if source.count(self.old) != 1:
            raise SystemExit(f"{peer}: patch {self.name!r} does not match its source exactly once; the peer changed, "
                             f"update the adapter (looked for {self.old[:80]!r})")
        return source.replace(self.old, self.new)

    def record(self) -> dict:
        return {"name": self.name, "why": self.why, "replace": self.old, "with": self.new}


def toy_templates() -> list[str]:
    from personalize.toyworld import TOY_MODEL_DIR

    return json.loads((TOY_MODEL_DIR / "personalize.json").read_text())["prompt_templates"]["object"]


class DiffusersTI:
    """diffusers' examples/textual_inversion/textual_inversion.py, run as its README runs it (accelerate's plain
    single-process launch is `python script.py`)."""

    name = "diffusers-ti"
    ours = OURS

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


ADAPTERS = {a.name: a for a in (DiffusersTI(),)}


def our_command(run: dict, extra: list[str]) -> list[str]:
    return [sys.executable, "-c", "import sys; from personalize.cli import main; sys.exit(main(sys.argv[1:]))",
            "train", "--method", "textual-inversion", "--model", "toy", "--images", run["images"], "--output", run["output"],
            "--token", run["token"], "--init-word", run["init_word"], "--resolution", str(run["resolution"]),
            "--batch-size", str(run["batch"]), "--steps", str(run["steps"]), "--lr", str(run["lr"]), "--seed", str(run["seed"]),
            "--mixed-precision", "no", "--num-validation-images", "0", "--checkpointing-steps", str(10**9),
            "--overwrite", *extra]


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
    parser.add_argument("--concepts", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-3, help="before scaling by the batch (both sides scale)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--samples", type=int, default=16, help="images of 'a <concept>' per run (sampling seeds 0..n-1)")
    parser.add_argument("--edit-samples", type=int, default=16, help="images per editing prompt")
    parser.add_argument("--only", action="append", default=[], help="run only these rows: 'ours' and/or peer names")
    parser.add_argument("--ours-args", default="", help="extra `personalize train` flags (a hypothesis); the row's label says them")
    parser.add_argument("--timing-only", action="store_true",
                        help="train only (no sampling or judge): rows with the costs alone, to OUTPUT/timing.jsonl")
    parser.add_argument("--report", metavar="OUTPUT", help="only write OUTPUT/peers.md from OUTPUT/rows.jsonl")
    args = parser.parse_args(argv)
    if args.report:
        print(report(Path(args.report)))
        return 0

    from personalize.toyworld import TOY_MODEL_DIR
    from personalize.toyworld.bench.common import BenchConfig, concept_name, concept_traits, load_model, measure_embedding, render_set
    from personalize.toyworld.judge import ToyJudge
    from personalize.toyworld.world import HELD_OUT

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
    ours_label = OURS + (f" [{args.ours_args}]" if extra else "")

    # Each peer's patched copy, written once into the work folder.
    scripts, records = {}, {}
    for name, path in peers.items():
        adapter, source_path = ADAPTERS[name], Path(path).resolve()
        if REPO in source_path.parents:
            parser.error(f"{name}: a peer's source must live outside this repository ({source_path})")
        source = source_path.read_text()
        patched = source
        for patch in adapter.patches():
            patched = patch.apply(patched, name)
        scripts[name] = work / "peer-src" / name / source_path.name
        scripts[name].parent.mkdir(parents=True, exist_ok=True)
        scripts[name].write_text(patched)
        records[name] = {"source": str(source_path), "source_sha256": hashlib.sha256(source.encode()).hexdigest(),
                         "patches": [p.record() for p in adapter.patches()],
                         "python": pythons.get(name, pythons.get("*", sys.executable))}

    cfg = BenchConfig(samples=args.samples, edit_samples=args.edit_samples, model="toy")
    judge = ToyJudge.load()
    for seed, concept in [(s, c) for s in range(args.seeds) for c in HELD_OUT[: args.concepts]]:  # seed-major: every
        traits, cname = concept_traits(concept), concept_name(concept_traits(concept))  # concept early, for the sign test
        images = work / cname / "images"
        references = render_set(images, 5, seed=1, **traits)  # the embeddings suite's training set
        sides = ([("ours", ours_label)] if not args.only or "ours" in args.only else []) + \
                [(name, name) for name in peers if not args.only or name in args.only]
        for side, label in sides:
            if (label, cname, seed) in done_keys(rows_file):
                continue
            out = work / cname / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}-{seed}"
            out.mkdir(parents=True, exist_ok=True)
            run = {"model": str(TOY_MODEL_DIR), "images": str(images), "output": str(out), "token": "<concept>",
                   "init_word": traits["shape"], "resolution": args.resolution, "batch": args.batch,
                   "steps": args.steps, "lr": args.lr, "seed": seed}
            if side == "ours":
                argv, record = our_command(run, extra), {"ours_args": args.ours_args}
            else:
                argv, record = ADAPTERS[side].command(records[side]["python"], scripts[side], run), records[side]
            cost = run_process(argv, out.parent / f"{out.name}.log", args.steps)
            measured = {} if args.timing_only else measure_embedding(
                cfg, load_model(cfg, [out]), judge, "<concept>", traits, references, grid=out / "a_concept.png")
            row = {"suite": "peers", "method": label, "side": side, "concept": cname, "seed": seed,
                   **{k: v for k, v in run.items() if k in ("steps", "batch", "lr", "resolution", "init_word")},
                   "precision": "fp32", "device": "cpu", **cost, "vector_norm": vector_norm(out, "<concept>"),
                   **measured, **record, "command": argv[3:] if side == "ours" else argv[1:]}
            with open(rows_file, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: row.get(k) for k in ("method", "concept", "seed", "image_alignment", "keeps_background",
                                                      "text_alignment", "seconds_per_step", "cpu_seconds", "vector_norm")}),
                  flush=True)
    print(report(output))
    return 0


def read_rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "rows.jsonl").read_text().splitlines() if line]


def per_run_table(rows: list[dict]) -> str:
    """One line per concept and seed, one cell per row (method): "a S" all traits / on black, all traits and black /
    seconds per step / norm of the learned vector; "—" where that run is missing. benchmarks/tables.py puts it in the
    README."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| concept | seed | " + " | ".join(f"{m}: a S / black bg / s/step / ‖v‖" for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for concept in dict.fromkeys(r["concept"] for r in rows):
        for seed in sorted({r["seed"] for r in rows if r["concept"] == concept}):
            cells = []
            for m in methods:
                r = next((r for r in rows if (r["method"], r["concept"], r["seed"]) == (m, concept, seed)), None)
                cells.append("—" if r is None else f"{r['image_alignment']:.2f} / {r['keeps_background']:.2f} / "
                             f"{r['seconds_per_step']:.3f} / {r['vector_norm']:.2f}")
            lines.append(f"| {concept} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(output: Path) -> str:
    """OUTPUT/peers.md: per concept and seed, mean ± std per row, and the bench's paired verdicts of each pair."""
    from personalize.toyworld.bench import format_claim, verdicts, CLAIM_HEADER
    from personalize.toyworld.bench.common import summarise

    rows = read_rows(output)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [f"# peers ({output.name})", "", "## per concept and seed", "", per_run_table(rows)]
    keep = ("image_alignment", "keeps_background", "edit_background", "text_alignment", "edit_keeps_concept",
            "seconds_per_step", "wall_seconds", "peak_rss_mib", "vector_norm")
    lines += ["", "## means", summarise([{k: v for k, v in r.items() if k in keep or k in ("suite", "method", "concept", "seed")}
                                         for r in rows])]
    claims = []
    for peer in [m for m in methods if not m.startswith(OURS)]:
        for ours in [m for m in methods if m == OURS]:  # rows with --ours-args are hypotheses: in the tables only
            claims += [("peers", metric, ours, peer, True) for metric in METRICS]
            claims += [("peers", metric, ours, peer, False) for metric in COSTS]
    if claims:
        lines += ["## paired verdicts (A = ours; the bench's rule: concept means, sign test over concepts, Holm)", "",
                  "| " + " | ".join(CLAIM_HEADER) + " |", "|---" * len(CLAIM_HEADER) + "|"]
        lines += ["| " + " | ".join([c["claim"], *format_claim(c)]) + " |" for c in verdicts(rows, claims)]
    timing_file = output / "timing.jsonl"
    if timing_file.is_file():  # --timing-only rows: the same runs without the judge, run one at a time
        timing = [json.loads(line) for line in timing_file.read_text().splitlines() if line]
        lines += ["", "## timing (--timing-only runs)", summarise(
            [{**{k: r[k] for k in ("method", "concept", "seed", "steps") if k in r}, "suite": "peers timing",
              **{k: r[k] for k in ("seconds_per_step", "cpu_seconds", "wall_seconds", "peak_rss_mib") if k in r}}
             for r in timing])]
    patches = {json.dumps(r.get("patches")): r["method"] for r in rows if r.get("patches")}
    for text, method in patches.items():
        lines += ["", f"patches applied to {method}:"] + [f"- `{p['name']}`: {p['why']}" for p in json.loads(text)]
    md = "\n".join(lines) + "\n"
    (output / "peers.md").write_text(md)
    return md


if __name__ == "__main__":
    sys.exit(main())
