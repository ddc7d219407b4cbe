"""Several processes through accelerate (gloo on this CPU): 2 processes × batch B train what 1 process × batch 2B
trains, and files are written once."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import EXAMPLE_IMAGES

# The two gradient halves are averaged by all-reduce instead of one mean: float rounding only, which Adam's division
# by √v can enlarge for a near-zero gradient to ~lr × 1e-3 in a weight (seen: 2e-5 at lr 4e-2).
TOLERANCE = 1e-4


def launch(processes: int, output, *args):
    """`accelerate launch --multi_gpu --num_processes N -m personalize.cli train ...` in a fresh interpreter: accelerate's
    torchrun launcher, which on a machine without GPUs runs the processes on the CPU with gloo (its `--cpu` flag
    starts a single process whatever --num_processes says)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", *(["--multi_gpu"] if processes > 1 else []),
               "-m", "personalize.cli", "train",
               "--images", str(EXAMPLE_IMAGES), "--output", str(output), "--num-validation-images", "0", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PERSONALIZE_MODEL": "tiny", "TQDM_DISABLE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("method, args, artefact", [
    ("textual-inversion", ["--init-word", "cat", "--lr", "1e-2"], "learned_embeds.safetensors"),
    ("dreambooth-lora", ["--class-word", "cat", "--lr", "1e-2", "--noise-offset", "0.05"], "pytorch_lora_weights.safetensors"),
])
def test_two_processes_with_batch_b_train_what_one_process_with_batch_2b_trains(tmp_path, method, args, artefact):
    common = ["--method", method, "--steps", 3, "--checkpointing-steps", 2, *args]
    launch(1, tmp_path / "one", *common, "--batch-size", 4)
    launch(2, tmp_path / "two", *common, "--batch-size", 2)
    one, two = load_file(str(tmp_path / "one" / artefact)), load_file(str(tmp_path / "two" / artefact))
    assert one.keys() == two.keys()
    moved = 0.0
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=TOLERANCE, atol=TOLERANCE)
        moved = max(moved, one[key].abs().max().item())
    assert moved > 0
    for run in ("one", "two"):  # logs, checkpoints and artefacts written by one process only
        lines = (tmp_path / run / "logs.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
        assert sorted(p.name for p in (tmp_path / run / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
        assert json.loads((tmp_path / run / "run.json").read_text())["status"] == "finished"
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "logs.jsonl").read_text().splitlines()] for run in ("one", "two")]
    assert losses[0][0] != losses[1][0]  # each process logs its own half's loss: the runs really were split


def test_every_method_trains_in_two_processes(tmp_path):
    from PIL import Image, ImageDraw

    masked = tmp_path / "masked"
    masked.mkdir()
    for src in sorted(EXAMPLE_IMAGES.glob("*.jpg"))[:1]:
        Image.open(src).save(masked / src.name)
        mask = Image.new("L", (128, 128), 0)
        ImageDraw.Draw(mask).ellipse((30, 30, 100, 110), fill=255)
        mask.save(masked / f"{src.stem}.mask.png")
    for method, args in (("dis2booth", ["--class-word", "cat", "--warmup-steps", 1, "--delta-steps", 1, "--rank", 2]),
                         ("singleinsert", ["--class-word", "cat", "--stage1-steps", 1, "--stage2-steps", 1, "--images", masked])):
        launch(2, tmp_path / method, "--method", method, "--steps", 2, "--batch-size", 1, *args)
        assert json.loads((tmp_path / method / "run.json").read_text())["status"] == "finished"
