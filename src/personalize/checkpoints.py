"""A run folder, and how a run stops and continues exactly.

What `personalize train` writes in its output folder besides the artefacts: `config.yaml` (the options that
ran), `run.json` (status, step), `logs.jsonl` (every logged value of every step, `StepLog`) and
`checkpoints/step-N/` (everything needed to continue exactly: trainable parameters, optimiser and scheduler
states, the run's generator and torch's RNG, the method's extra state, the EMA of `ParameterEMA`, and the
options the run trained with). A checkpoint is written into a temporary folder and renamed into place, so a run
killed at any moment leaves the previous one whole.

A resumed run must be the run it continues: options that change what is trained are refused on resume
(`refuse_changed_options`); only the ones that say how long to train and when to save, preview or log may change.
Ctrl-C and SIGTERM (a cluster scheduler's warning before it preempts a job) stop the loop at the end of the step
with a checkpoint (`StopOnSignal`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from safetensors.torch import load_file, save_file

from .errors import PersonalizeError
from .export import atomic_write

if TYPE_CHECKING:
    from .methods import Method
    from .trainer import TrainConfig

log = logging.getLogger("personalize")
RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
LOG_FILE = "logs.jsonl"

# Options a resumed run may change: how long to train (with a constant rate only, see `refuse_changed_options`),
# where and when to save, preview and log, and how to spend memory. Every other option changes what is trained.
RESUMABLE_CHANGES = frozenset({
    "steps", "resume", "overwrite", "output", "checkpointing_steps", "checkpoints_total_limit", "validation_steps",
    "validation_prompts", "num_validation_images", "inference_steps", "guidance", "report_to", "export_ema",
    "gradient_checkpointing", "personalize",
})


# -- the output folder -----------------------------------------------------------------------------------------


def read_run(output: Path) -> dict:
    """run.json of a run folder ({} before the trainer wrote it)."""
    try:
        return json.loads((output / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_run(output: Path, **info) -> None:
    atomic_write(output / RUN_FILE, lambda tmp: tmp.write_text(json.dumps(info, indent=1)))


def prepare_output(cfg: TrainConfig) -> Path:
    """Create the output folder; refuse to clobber an earlier run unless told to resume or overwrite."""
    if not cfg.output:
        raise PersonalizeError("--output is required: the folder where the run writes its files")
    output = Path(cfg.output)
    if output.exists() and not output.is_dir():
        raise PersonalizeError(f"--output {output} exists and is not a folder")
    run = read_run(output)
    has_checkpoints = any((output / "checkpoints").glob("step-*"))
    if cfg.overwrite:
        shutil.rmtree(output / "checkpoints", ignore_errors=True)
        (output / RUN_FILE).unlink(missing_ok=True)
    elif cfg.resume is None and (run or has_checkpoints):
        what = "a finished run" if run.get("status") == "finished" else "an unfinished run"
        raise PersonalizeError(f"{output} already holds {what}; pass --resume latest to continue it or --overwrite to start over")
    output.mkdir(parents=True, exist_ok=True)
    return output


def run_options(cfg: TrainConfig, method_cfg) -> dict:
    """Every option of the run, the loop's and the method's, as config.yaml and each checkpoint record them."""
    from . import __version__

    return {"personalize": __version__, **asdict(cfg), **asdict(method_cfg)}


def write_resolved_config(output: Path, options: dict) -> None:
    atomic_write(output / CONFIG_FILE, lambda tmp: tmp.write_text(yaml.safe_dump(options, sort_keys=False)))


# -- checkpoints -----------------------------------------------------------------------------------------------


@dataclass
class TrainingState:
    """What a checkpoint saves and restores: with it the run continues as if it had never stopped."""

    method: Method
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler]
    generator: torch.Generator  # every random draw of the loop goes through it
    ema: ParameterEMA | None = None


def checkpoint_dirs(output: Path) -> list[Path]:
    found = [p for p in (output / "checkpoints").glob("step-*") if re.fullmatch(r"step-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(output: Path, step: int, state: TrainingState, options: dict, limit: int) -> Path:
    """Everything needed to continue exactly, written to a temporary folder and renamed into place; then only the
    newest `limit` checkpoints are kept."""
    final = output / "checkpoints" / f"step-{step:06d}"
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".step-{step:06d}-"))
    try:
        save_file(state.method.trainable_state(), str(tmp / "trainable.safetensors"))
        torch.save(
            {
                "optimizers": {k: o.state_dict() for k, o in state.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in state.schedulers.items()},
                "generator": state.generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "method": state.method.extra_state(),
                "ema": state.ema.shadow if state.ema is not None else None,
            },
            tmp / "state.pt",
        )
        # The options it was trained with: a resume compares its own against these (JSON keeps floats exact).
        (tmp / "step.json").write_text(json.dumps({"step": step, "options": options}, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PersonalizeError(f"could not write checkpoint {final}: {exc.strerror or exc}") from exc
    except BaseException:  # a second Ctrl-C while writing: leave no half-written temporary folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(output)[:-limit] if limit > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, state: TrainingState) -> int:
    """Restore `state` from a checkpoint folder; return the step it was saved at."""
    state.method.load_trainable_state(load_file(str(path / "trainable.safetensors")))
    saved = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    for k, o in state.optimizers.items():
        o.load_state_dict(saved["optimizers"][k])
    for k, s in state.schedulers.items():
        s.load_state_dict(saved["schedulers"][k])
    state.generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    state.method.load_extra_state(saved.get("method", {}))
    if state.ema is not None:
        if saved.get("ema") is None:
            raise PersonalizeError(f"{path} was saved without --ema-decay: resume it without EMA, or start over")
        state.ema.load(saved["ema"])
    return json.loads((path / "step.json").read_text())["step"]


def find_resume(output: Path, resume: str) -> Path | None:
    """The checkpoint `--resume` names ('latest': the newest in OUTPUT/checkpoints; None when there is none)."""
    if resume != "latest":
        path = Path(resume)
        if not (path / "step.json").exists():
            raise PersonalizeError(f"--resume {resume}: not a checkpoint folder (expected {output}/checkpoints/step-N)")
        return path
    found = checkpoint_dirs(output)
    if not found:
        log.warning("--resume latest: no checkpoint in %s, starting from step 0", output)
    return found[-1] if found else None


def trained_options(checkpoint: Path) -> dict | None:
    """The options a checkpoint was trained with: its own record, else (a checkpoint of an older version) its run
    folder's config.yaml; None when neither exists."""
    recorded = json.loads((checkpoint / "step.json").read_text()).get("options")
    if recorded is not None:
        return recorded
    config = checkpoint.parent.parent / CONFIG_FILE
    return yaml.safe_load(config.read_text()) if config.is_file() else None


def refuse_changed_options(checkpoint: Path, options: dict) -> None:
    """Refuse to resume with options that change what is trained, naming each (old -> new) and the ways forward.

    Silently keeping the old value (an optimiser's state holds its rate) or silently applying the new one (in the
    middle of a run) would both leave config.yaml describing a run that never happened. --steps may change (to
    extend or shorten a run) only with a constant rate: a decaying one is laid out over --steps."""
    before = trained_options(checkpoint)
    if before is None:
        log.warning("%s records no options: cannot check that the resumed run uses the same", checkpoint)
        return
    now = json.loads(json.dumps(options, default=str))  # as the record was written: lists for tuples, str for paths
    changed = {k: (before[k], now[k]) for k in now if k in before and not _same(before[k], now[k]) and k not in RESUMABLE_CHANGES}
    if "steps" in before and before["steps"] != now["steps"] and now.get("lr_scheduler", "constant") != "constant":
        changed["steps"] = (before["steps"], now["steps"])
    if not changed:
        return

    def shown(value) -> str:
        return "(default)" if value is None else str(value)

    listed = ", ".join(f"--{k.replace('_', '-')} {shown(old)} -> {shown(new)}" for k, (old, new) in changed.items())
    decay = (" (--steps: the rate's decay is laid out over --steps; a new length needs --lr-scheduler constant)"
             if "steps" in changed else "")
    run_config = checkpoint.parent.parent / CONFIG_FILE
    raise PersonalizeError(
        f"--resume {checkpoint}: the run was trained with other options: {listed}{decay}. A resumed run continues "
        f"with its own options: drop or correct these flags (`--config {run_config}` passes them all), or train "
        f"with the new ones into a new --output")


def _same(before, now) -> bool:
    """Equal values, or two spellings of one existing path (`imgs` and `./imgs`, relative and absolute)."""
    if before == now:
        return True
    paths = isinstance(before, str) and isinstance(now, str) and os.path.exists(before) and os.path.exists(now)
    return paths and os.path.samefile(before, now)


# -- stopping ---------------------------------------------------------------------------------------------------


class TrainingStopped(KeyboardInterrupt):
    """The loop stopped on Ctrl-C or SIGTERM after saving a checkpoint. A KeyboardInterrupt, so that whoever
    handles Ctrl-C (the CLI: exit status 130, as a shell reports an interrupted command) handles this too."""


class StopOnSignal:
    """Within the block, Ctrl-C (SIGINT) and SIGTERM ask the loop to stop at the end of the current step instead of
    killing it in the middle: the loop checks `requested` at each step boundary, checkpoints and stops. A second
    Ctrl-C aborts at once (KeyboardInterrupt), keeping the last checkpoint; a repeated SIGTERM does not, as a
    launcher (torchrun) forwards the terminal's Ctrl-C to its workers as SIGTERM, and whoever sends SIGTERM sends
    SIGKILL when tired of waiting. Only the main thread can handle signals; elsewhere (a library caller's worker
    thread) the block changes nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None  # the first signal
        self._interrupts = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self._interrupts += signum == signal.SIGINT
        if self._interrupts > 1:
            raise KeyboardInterrupt  # Ctrl-C twice: the user will not wait for the step
        if self.received is None:
            self.received = signum
            log.warning("\n%s: stopping after this step with a checkpoint (Ctrl-C again to abort at once)",
                        signal.Signals(signum).name)

    def requested(self, accelerator) -> bool:
        """Whether any process received a signal: every process must stop at the same step (they meet in the
        gradient all-reduce), so with several the flag is agreed on by one small all-reduce per step."""
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor([float(self.received is not None)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


# -- beside the checkpoints: what they save and what each step writes ------------------------------------------


class ParameterEMA:
    """Exponential moving average of the trained parameters: ema ← d·ema + (1 − d)·θ after every training step."""

    def __init__(self, method: Method, decay: float):
        trained = {id(p) for group in method.param_groups().values() for p in group}
        self.params = {k: p for k, p in method.named_parameters() if id(p) in trained}
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach().float(), 1 - self.decay)

    def load(self, shadow: dict[str, torch.Tensor]) -> None:
        self.shadow = {k: v.to(self.params[k].device).float() for k, v in shadow.items()}

    @contextlib.contextmanager
    def swapped_in(self):
        """The EMA weights in place of the live ones for the block (the export), the live ones back afterwards."""
        live = {k: p.detach().clone() for k, p in self.params.items()}
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(live[k])


class StepLog:
    """Every logged value of every step, one JSON line per step in OUTPUT/logs.jsonl: plottable with no service."""

    def __init__(self, output: Path, start: int):
        self.path = output / LOG_FILE
        kept = []
        if self.path.exists():  # a resumed run drops what the killed one logged after its checkpoint
            kept = [line for line in self.path.read_text().splitlines() if line and _logged_step(line) <= start]
        atomic_write(self.path, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in kept)))

    def write(self, step: int, values: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")


def _logged_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line of a killed run: dropped
