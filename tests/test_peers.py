"""benchmarks/peers.py without training: the patches a peer gets, the command it runs, and the report's tables and
paired verdicts from synthetic rows."""

import json
from pathlib import Path

import pytest

from conftest import load_benchmark_script

@pytest.fixture(scope="module")
def peers():
    return load_benchmark_script("peers")


SOURCE = 'imagenet_templates_small = [\n    "a photo of a {}",\n]\n\n\nclass TextualInversionDataset(Dataset):\n    pass\n'


def test_the_diffusers_patch_sets_the_toy_templates_and_refuses_a_changed_source(peers):
    (patch,) = peers.DiffusersTI().patches()
    patched = patch.apply(SOURCE, "diffusers-ti")
    namespace = {"Dataset": object}
    exec(patched, namespace)  # the patched module-level list is what the dataset reads
    assert namespace["imagenet_templates_small"] == ["a {}"] == peers.toy_templates()
    assert patched.startswith(SOURCE.split("class")[0])  # their list is left as it was, overridden after it
    with pytest.raises(SystemExit, match="toy-templates"):
        patch.apply(SOURCE.replace("class TextualInversionDataset", "class Renamed"), "diffusers-ti")


def test_both_sides_train_with_equal_settings(peers):
    run = {"model": "M", "images": "I", "output": "O", "token": "<concept>", "init_word": "star", "resolution": 64,
           "batch": 4, "steps": 300, "lr": 0.005, "seed": 2}
    theirs = peers.DiffusersTI().command("py", Path("s.py"), run)
    ours = peers.our_command(run, ["--weight-decay", "0.01"])

    def flag(argv, name):
        return argv[argv.index(name) + 1]

    for mine, their in (("--resolution", "--resolution"), ("--batch-size", "--train_batch_size"), ("--steps", "--max_train_steps"),
                        ("--lr", "--learning_rate"), ("--seed", "--seed"), ("--init-word", "--initializer_token"),
                        ("--token", "--placeholder_token"), ("--mixed-precision", "--mixed_precision")):
        assert flag(ours, mine) == flag(theirs, their), mine
    assert "--scale_lr" in theirs and flag(theirs, "--lr_scheduler") == "constant"  # ours scales by the batch by default
    assert ours[-2:] == ["--weight-decay", "0.01"]


def test_report_tables_and_verdicts_from_rows(peers, tmp_path):
    rows = []
    for method, rate in ((peers.OURS, 0.9), ("diffusers-ti", 0.8), (peers.OURS + " [--weight-decay 0.01]", 0.7)):
        for concept in ("a", "b", "c"):
            for seed in (0, 1):
                rows.append({"suite": "peers", "method": method, "concept": concept, "seed": seed, "image_alignment": rate,
                             "keeps_background": rate, "edit_keeps_concept": rate, "text_alignment": 1.0,
                             "edit_background": 1.0, "seconds_per_step": 0.2, "wall_seconds": 70.0, "peak_rss_mib": 600.0,
                             "vector_norm": 3.0, "patches": [{"name": "toy-templates", "why": "W"}] if method == "diffusers-ti" else None})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = peers.report(tmp_path)
    assert md == (tmp_path / "peers.md").read_text()
    assert "| a | 1 | 0.90 / 0.90 / 0.200 / 3.00 | 0.80 / 0.80 / 0.200 / 3.00 | 0.70 / 0.70 / 0.200 / 3.00 |" in md
    claims = [line for line in md.splitlines() if " on image_alignment |" in line]
    assert len(claims) == 1  # hypothesis rows (--ours-args) are tabulated, never a claim
    assert "| 3 (6+6) | 3-0-0 | +0.1 [+0.1, +0.1] | 0.25 |" in claims[0] and claims[0].endswith("inside noise |")
    assert "- `toy-templates`: W" in md
