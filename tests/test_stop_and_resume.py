"""Stopping and resuming: Ctrl-C and SIGTERM keep the work (a checkpoint at the step, exit 130) and `--resume latest`
continues it exactly; a resume with options that change what is trained is refused, naming them, and config.yaml
always says what ran."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import EXAMPLE_IMAGES
from personalize import cli
from personalize.checkpoints import StopOnSignal, checkpoint_dirs


def run(args, expect=0):
    assert cli.main(["train", *map(str, args)]) == expect


def ti_args(out, *extra):
    return ["--images", EXAMPLE_IMAGES, "--output", out, "--init-word", "cat", "--batch-size", 2,
            "--num-validation-images", 0, *extra]


def embedding(out) -> torch.Tensor:
    return load_file(str(out / "learned_embeds.safetensors"))["<concept>"]


def logged(out) -> list[dict]:
    path = out / "logs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def start_cli(out, *args) -> subprocess.Popen:
    """`personalize train` in a process of its own, as a terminal or the UI starts it."""
    env = {**os.environ, "PERSONALIZE_MODEL": "tiny", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "personalize.cli", "train", *map(str, ti_args(out, *args))],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_stops_at_a_step_with_a_checkpoint_and_resume_continues_exactly(tmp_path, sig):
    """Ctrl-C (and the UI's Stop, which sends it) or a scheduler's SIGTERM after a few logged steps, long before the
    first periodic checkpoint (every 500): exit 130, a checkpoint at the last logged step, run.json says stopped; and
    `--resume latest` then ends bit-identical to a run never stopped."""
    args = ["--steps", 100_000, "--seed", 2, "--lr", "5e-3"]  # constant rate: the run's length changes no step's update
    out = tmp_path / "stopped"
    child = start_cli(out, *args)
    try:
        give_up = time.monotonic() + 600  # (a hung child fails the test instead of hanging it)
        while len(logged(out)) < 3:
            assert child.poll() is None, child.communicate()[1][-3000:]
            assert time.monotonic() < give_up, "no step logged in 10 minutes"
            time.sleep(0.05)
        child.send_signal(sig)
        _, err = child.communicate(timeout=600)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 130, err[-3000:]
    status = json.loads((out / "run.json").read_text())
    stopped_at = status["step"]
    assert status["status"] == "stopped" and stopped_at >= 3 and "--resume latest" in err
    assert [p.name for p in checkpoint_dirs(out)] == [f"step-{stopped_at:06d}"]
    assert [row["step"] for row in logged(out)] == list(range(1, stopped_at + 1))  # no logged step is lost
    assert not list((out / "checkpoints").glob(".*"))  # no temporary folder left

    total = ["--steps", stopped_at + 2]  # two steps more than it made: --steps may change on resume (constant rate)
    run(ti_args(out, *args, *total, "--resume", "latest"))
    run(ti_args(tmp_path / "straight", *args, *total))
    assert torch.equal(embedding(out), embedding(tmp_path / "straight"))
    assert logged(out) == logged(tmp_path / "straight")


def test_the_uis_stop_keeps_the_work(tmp_path, monkeypatch):
    """The web UI's Stop (SIGINT to the job's process group) on a real training job: the job ends stopped at a
    checkpoint of the step it reached, not "before its first checkpoint" (every 500 steps)."""
    from personalize.ui.jobs import JobManager, checkpoint_steps
    from personalize.ui.workspace import Workspace

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    jobs = JobManager(Workspace(tmp_path))
    job = jobs.submit("train", ["train", *map(str, ti_args("runs/a", "--steps", 100_000))], "runs/a")
    give_up = time.monotonic() + 600
    while len(logged(tmp_path / "runs" / "a")) < 2:
        jobs.poll()
        assert job.state == "running", jobs.log_tail(job)
        assert time.monotonic() < give_up, "no step logged in 10 minutes"
        time.sleep(0.05)
    jobs.stop(job.id)
    while job.state == "running":
        jobs.poll()
        assert time.monotonic() < give_up, "the job did not stop"
        time.sleep(0.05)
    saved = checkpoint_steps(tmp_path / "runs" / "a")
    assert (job.state, job.returncode) == ("stopped", 130), jobs.log_tail(job)
    assert len(saved) == 1 and saved[0] >= 2 and job.message == f"stopped; Resume continues from step {saved[0]}"


def test_a_second_ctrl_c_aborts_at_once_and_the_handlers_are_put_back():
    """SIGTERM, even repeated (a launcher forwards the terminal's Ctrl-C to its workers as SIGTERM), and a first
    Ctrl-C only ask the loop to stop at the step's end; a second Ctrl-C aborts. Afterwards the handlers are back."""
    if threading.current_thread() is not threading.main_thread():
        pytest.fail("signal handlers can only be tested on the main thread")

    def deliver(sig):
        os.kill(os.getpid(), sig)
        for _ in range(1000):  # Python runs a handler between bytecodes of the main thread: within a few
            pass

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), StopOnSignal() as stop:
        deliver(signal.SIGTERM)
        deliver(signal.SIGTERM)
        deliver(signal.SIGINT)
        assert stop.received == signal.SIGTERM  # asked, not aborted
        deliver(signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_resume_with_a_changed_option_is_refused_naming_each_and_config_agrees_with_the_logs(tmp_path, capsys):
    """`--resume latest --lr 0.05` on a run trained at 0.01 once kept the old rate silently while config.yaml said
    0.05. Now it is refused before anything trains, naming every changed option old -> new and the ways forward."""
    out = tmp_path / "run"
    run(ti_args(out, "--steps", 2, "--lr", "1e-2", "--checkpointing-steps", 2))
    same_images = f"{EXAMPLE_IMAGES}/../{EXAMPLE_IMAGES.name}"  # another spelling of the same folder
    run(ti_args(out, "--steps", 4, "--lr", "0.05", "--seed", 3, "--images", same_images, "--resume", "latest"), expect=2)
    err = capsys.readouterr().err
    listed = err.split("other options: ")[1].split(". A resumed")[0]
    assert listed == "--lr 0.01 -> 0.05, --seed 0 -> 3"  # not --steps (a constant-rate run may grow), nor --images
    assert f"--config {out / 'config.yaml'}" in err and "new --output" in err
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["lr"] == 0.01 and config["steps"] == 2
    assert [row["step"] for row in logged(out)] == [1, 2]  # nothing trained
    assert all(row["lr/main"] == pytest.approx(config["lr"] * 2) for row in logged(out))  # × batch 2 (--scale-lr)

    # The run's own options (its config.yaml) resume it; --steps may grow, and config.yaml records what ran.
    run(["--config", out / "config.yaml", "--steps", 4, "--resume", "latest"])
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["steps"] == 4 and config["lr"] == 0.01 and config["resume"] == "latest"
    assert [row["step"] for row in logged(out)] == [1, 2, 3, 4]
    assert all(row["lr/main"] == pytest.approx(config["lr"] * 2) for row in logged(out))


def test_a_checkpoint_without_its_options_is_checked_against_the_run_config(tmp_path, capsys):
    """Checkpoints of earlier versions record no options: the run folder's config.yaml stands in for them."""
    out = tmp_path / "run"
    run(ti_args(out, "--steps", 2, "--lr", "1e-2", "--checkpointing-steps", 2))
    step_file = checkpoint_dirs(out)[-1] / "step.json"
    step_file.write_text(json.dumps({"step": 2}))
    run(ti_args(out, "--steps", 3, "--lr", "2e-2", "--resume", "latest"), expect=2)
    assert "--lr 0.01 -> 0.02" in capsys.readouterr().err


def test_a_new_length_with_a_decaying_rate_is_refused(tmp_path, capsys):
    """A cosine rate is laid out over --steps: a resume to another length would re-shape it under the steps run."""
    out = tmp_path / "run"
    args = ["--lr", "1e-2", "--lr-scheduler", "cosine", "--checkpointing-steps", 2]
    run(ti_args(out, "--steps", 2, *args))
    run(ti_args(out, "--steps", 4, *args, "--resume", "latest"), expect=2)
    err = capsys.readouterr().err
    assert "--steps 2 -> 4" in err and "--lr-scheduler constant" in err


@pytest.mark.parametrize("lr", ["0", "-1e-3"])
def test_a_rate_of_zero_or_below_is_refused_with_the_reason(tmp_path, capsys, lr):
    run(ti_args(tmp_path / "o", "--steps", 1, f"--lr={lr}"), expect=2)
    err = capsys.readouterr().err
    assert f"--lr {float(lr)}: must be positive" in err and "trains nothing" in err
    assert not (tmp_path / "o").exists()  # refused before any work
