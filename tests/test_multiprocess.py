"""Several processes through accelerate (gloo on this CPU): 2 processes × batch B train what 1 process × batch 2B
trains, and files are written once."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import EXAMPLE_IMAGES
from personalize import cli

# The two gradient halves are averaged by all-reduce instead of one mean: float rounding only, which Adam's division
# by √v can enlarge for a near-zero gradient to ~lr × 1e-3 in most weights (seen: 2e-5 at lr 4e-2) and, rarely, to
# a sizeable part of lr (seen: 8.7e-4 in 1 of 256 elements of a LoRA A, DreamBooth-LoRA without mirrors): see
# assert_equal_to_rounding.
TOLERANCE = 1e-4


def assert_equal_to_rounding(two: torch.Tensor, one: torch.Tensor, steps: int, lr: float) -> None:
    """Every element within TOLERANCE, except a few: Adam divides each gradient by its own running size, so a gradient
    that is rounding noise (an element of LoRA's A while B is still ~0) moves its weight by up to ~lr per step, whatever
    its sign; where the all-reduce rounds differently from one mean, such an element lands elsewhere. At most 1 % of a
    tensor's elements may do so, and by no more than steps × lr: a wrong shard or a missed gradient moves most of them."""
    off = (two - one).abs()
    assert (off > TOLERANCE).float().mean().item() <= 0.01, f"{int((off > TOLERANCE).sum())} of {off.numel()} elements differ"
    assert off.max().item() <= steps * lr, off.max().item()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(processes: int, output, *args) -> subprocess.Popen:
    """`accelerate launch --multi_gpu --num_processes N -m personalize.cli train ...` in a fresh interpreter: accelerate's
    torchrun launcher, which on a machine without GPUs runs the processes on the CPU with gloo (its `--cpu` flag
    starts a single process whatever --num_processes says). Started, not awaited: its interpreters spend most of
    their time importing, which the caller can overlap with other work. Each launch rendezvouses on a port of its
    own, so two can run at once."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               *(["--multi_gpu"] if processes > 1 else []), "-m", "personalize.cli", "train",
               "--images", str(EXAMPLE_IMAGES), "--output", str(output), "--num-validation-images", "0", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PERSONALIZE_MODEL": "tiny", "TQDM_DISABLE": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(launched: subprocess.Popen) -> None:
    try:
        _, stderr = launched.communicate(timeout=600)
    finally:
        if launched.poll() is None:  # timed out (or the test was interrupted): leave no trainer behind
            launched.kill()
            launched.communicate()
    assert launched.returncode == 0, stderr[-3000:]


def launch(processes: int, output, *args) -> None:
    finish(start(processes, output, *args))


def train_in_this_process(output, *args) -> None:
    """The one-process reference: the same `personalize train` in this interpreter (already imported, so seconds
    instead of a launcher's and a child's start-up), on one thread as the launched children are (OMP_NUM_THREADS=1),
    so thread count adds no rounding of its own to the comparison."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["train", "--images", str(EXAMPLE_IMAGES), "--output", str(output), "--num-validation-images", "0",
                         *map(str, args)]) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("method, args, artefact", [
    ("textual-inversion", ["--init-word", "cat", "--lr", "1e-2"], "learned_embeds.safetensors"),
    ("dreambooth-lora", ["--class-word", "cat", "--lr", "1e-2", "--noise-offset", "0.05"], "pytorch_lora_weights.safetensors"),
])
def test_two_processes_with_batch_b_train_what_one_process_with_batch_2b_trains(tmp_path, method, args, artefact):
    common = ["--method", method, "--steps", 3, "--checkpointing-steps", 2, *args]
    two = start(2, tmp_path / "two", *common, "--batch-size", 2)
    train_in_this_process(tmp_path / "one", *common, "--batch-size", 4)  # while the two processes start up
    finish(two)
    one, two = load_file(str(tmp_path / "one" / artefact)), load_file(str(tmp_path / "two" / artefact))
    assert one.keys() == two.keys()
    moved = 0.0
    for key in one:
        assert_equal_to_rounding(two[key], one[key], steps=3, lr=1e-2 * 4)  # the rate scaled by the global batch
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
    runs = {method: start(2, tmp_path / method, "--method", method, "--steps", 2, "--batch-size", 1, *args)
            for method, args in (("dis2booth", ["--class-word", "cat", "--warmup-steps", 1, "--delta-steps", 1, "--rank", 2]),
                                 ("singleinsert", ["--class-word", "cat", "--stage1-steps", 1, "--stage2-steps", 1,
                                                   "--images", masked]))}  # both at once: each spends most of its time importing
    for method, launched in runs.items():
        finish(launched)
        assert json.loads((tmp_path / method / "run.json").read_text())["status"] == "finished"
