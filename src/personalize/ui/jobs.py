"""Jobs: every piece of work the UI starts is a `personalize ...` command run in a child process of its own.

One job runs at a time (a second training would share the GPU and memory with the first); the others wait in a
queue. The list lives in the workspace (`.personalize-ui/jobs.json`) and each job's output in a log file beside it,
and a child runs in a session of its own: closing the browser, or killing the UI, stops nothing. A UI started
again later finds its jobs where they were: a child still running is watched again through its run folder, one
that died is shown stopped, and a training run continues with the trainer's own `--resume latest`.

Progress is read from what the trainer writes anyway (run.json, logs.jsonl, validation/step-N.png), never from the
child's terminal output, so a second browser tab, or a UI started after the run, sees the same thing.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import PersonalizeError
from ..export import atomic_write
from .workspace import Workspace

JOBS_FILE = "jobs.json"
# After SIGINT the child finishes its step and writes a checkpoint (an SDXL step plus a LoRA checkpoint can take a
# minute on a small GPU); only then is it killed, losing what the checkpoint would have kept.
STOP_GRACE_S = 120.0
ACTIVE = ("queued", "running")


def _last_redraw(line: str) -> str:
    """What a terminal shows of a line redrawn with carriage returns: its last non-blank redraw."""
    redraws = [part for part in line.split("\r") if part.strip()]
    return redraws[-1] if redraws else ""


@dataclass
class Job:
    id: str
    kind: str  # train, generate, evaluate, mask
    argv: list[str]  # personalize's argv, verb first: exactly what the UI shows
    folder: str  # what the job writes, relative to the workspace (a run folder, samples/, eval-toy/)
    state: str = "queued"  # queued, running, finished, failed, stopped
    pid: int | None = None
    returncode: int | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    message: str = ""  # why it failed or stopped, in the child's own words
    stop_requested: float | None = None

    @property
    def command(self) -> str:
        """The job as a person would type it, in the workspace folder."""
        return "personalize " + shlex.join(self.argv)

    @property
    def log_name(self) -> str:
        return f"{self.id}.log"


class JobManager:
    """The workspace's job list: submit, run one at a time, stop, resume, and report progress."""

    def __init__(self, workspace: Workspace, python: str = sys.executable):
        self.workspace = workspace
        self.python = python
        self.processes: dict[str, subprocess.Popen] = {}  # children this UI process started
        self.samples: dict[str, list[tuple[float, int]]] = {}  # job id -> (time, step) seen, for the ETA
        self.dir = workspace.state_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jobs: list[Job] = self._load()
        self.poll()

    # -- the list ----------------------------------------------------------------------------------------------

    def _load(self) -> list[Job]:
        path = self.dir / JOBS_FILE
        if not path.is_file():
            return []
        try:
            return [Job(**row) for row in json.loads(path.read_text())]
        except (ValueError, TypeError) as exc:
            raise PersonalizeError(f"{path} is not a job list this UI can read ({exc}); move it away to start afresh") from exc

    def _save(self) -> None:
        rows = [asdict(job) for job in self.jobs]
        atomic_write(self.dir / JOBS_FILE, lambda tmp: tmp.write_text(json.dumps(rows, indent=1)))

    def get(self, job_id: str) -> Job:
        for job in self.jobs:
            if job.id == job_id:
                return job
        raise PersonalizeError(f"no job {job_id}")

    @property
    def running(self) -> Job | None:
        return next((j for j in self.jobs if j.state == "running"), None)

    @property
    def queued(self) -> list[Job]:
        return [j for j in self.jobs if j.state == "queued"]

    def latest(self, kind: str | None = None, folder: str | None = None) -> Job | None:
        """The newest job of that kind and/or folder (a running one first): what a newly opened tab shows."""
        match = [j for j in self.jobs if (kind is None or j.kind == kind) and (folder is None or j.folder == folder)]
        active = [j for j in match if j.state in ACTIVE]
        return (active or match or [None])[-1]

    # -- running -----------------------------------------------------------------------------------------------

    def submit(self, kind: str, argv: list[str], folder: str) -> Job:
        """Queue `personalize ARGV`; it starts at once when nothing else runs."""
        busy = [j for j in self.jobs if j.state in ACTIVE and j.folder == folder]
        if busy:
            raise PersonalizeError(f"{folder} already has a {busy[0].state} {busy[0].kind} job; stop it first")
        job = Job(uuid.uuid4().hex[:8], kind, list(argv), folder)
        self.jobs.append(job)
        self._save()
        self.poll()
        return job

    def poll(self) -> None:
        """Notice ended children, stop the ones asked to stop, start the next queued job. Cheap: call it often."""
        changed = False
        for job in [j for j in self.jobs if j.state == "running"]:
            changed |= self._check(job)
        if self.running is None and self.queued:
            self._start(self.queued[0])
            changed = True
        if changed:
            self._save()

    def _start(self, job: Job) -> None:
        log = open(self.dir / job.log_name, "ab")  # noqa: SIM115 - the child owns it from here
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "2"}
        env.pop("PYTEST_CURRENT_TEST", None)
        log.write(f"$ {job.command}\n".encode())
        log.flush()
        proc = subprocess.Popen([self.python, "-m", "personalize.cli", *job.argv], cwd=self.workspace.root,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True,  # its own session: the UI's Ctrl-C or death does not reach it
                                preexec_fn=_default_sigint)
        log.close()
        self.processes[job.id] = proc
        job.state, job.pid, job.started = "running", proc.pid, time.time()

    def _check(self, job: Job) -> bool:
        """Update a running job; True when its state changed."""
        proc = self.processes.get(job.id)
        code = proc.poll() if proc is not None else (None if _alive(job.pid) else -1)
        if code is None:
            if job.stop_requested and time.time() - job.stop_requested > STOP_GRACE_S:
                _signal(job.pid, signal.SIGKILL)
            return False
        self.processes.pop(job.id, None)
        job.returncode, job.ended = (code if proc is not None else None), time.time()
        finished = code == 0 or (proc is None and self._run_finished(job))
        if finished:
            job.state, job.message = "finished", ""
        elif job.stop_requested or code in (130, -signal.SIGINT, -signal.SIGKILL) or proc is None:
            job.state = "stopped"
            job.message = self._stopped_message(job)
        else:
            job.state, job.message = "failed", self.error_of(job)
        return True

    def _run_finished(self, job: Job) -> bool:
        return job.kind == "train" and run_status(self.workspace.root / job.folder).get("status") == "finished"

    def _stopped_message(self, job: Job) -> str:
        if job.kind != "train":
            return "stopped"
        saved = checkpoint_steps(self.workspace.root / job.folder)
        return f"stopped; Resume continues from step {saved[-1]}" if saved else "stopped before its first checkpoint; Resume starts it again"

    def stop(self, job_id: str) -> Job:
        """A queued job is dropped; a running one gets SIGINT (Ctrl-C: the CLI exits cleanly), then SIGKILL."""
        job = self.get(job_id)
        if job.state == "queued":
            job.state, job.message, job.ended = "stopped", "removed from the queue", time.time()
        elif job.state == "running" and job.stop_requested is None:
            job.stop_requested = time.time()
            _signal(job.pid, signal.SIGINT)
        self._save()
        return job

    def resume_argv(self, folder: str) -> list[str]:
        """`personalize train ... --resume latest` for a run folder: the command that started it when this UI ran
        it (without --overwrite, which would delete the checkpoints), else the run's own resolved config.yaml."""
        started = [j for j in self.jobs if j.kind == "train" and j.folder == folder]
        if started:
            argv = _without(started[-1].argv, "--overwrite", "--resume", "--resume_from_checkpoint")
        elif (self.workspace.root / folder / "config.yaml").is_file():
            argv = ["train", "--config", f"{folder}/config.yaml", "--output", folder]
        else:
            raise PersonalizeError(f"{folder} holds no run this UI can resume (no config.yaml)")
        return [*argv, "--resume", "latest"]

    # -- reading a job -----------------------------------------------------------------------------------------

    def log_tail(self, job: Job, lines: int = 20) -> str:
        path = self.dir / job.log_name
        if not path.is_file():
            return ""
        text = path.read_bytes()[-20000:].decode("utf-8", errors="replace")
        # tqdm redraws its bar with carriage returns: keep what a terminal shows, each line's last redraw.
        shown = [_last_redraw(line) for line in text.split("\n")]
        return "\n".join([line for line in shown if line.strip()][-lines:])

    def error_of(self, job: Job) -> str:
        """The child's own last word: its `error: ...` line (a PersonalizeError), else the end of its traceback."""
        tail = self.log_tail(job, 200).splitlines()
        errors = [line.removeprefix("error: ") for line in tail if line.startswith("error: ")]
        if errors:
            return errors[-1]
        return "\n".join(tail[-4:]) or f"exited with status {job.returncode}"

    def progress(self, job: Job) -> dict:
        """Step, steps, ETA (s), it/s, losses, previews and checkpoints of a training job, from its run folder."""
        info = train_progress(self.workspace.root / job.folder)
        if job.state == "running" and info["step"] is not None:
            seen = self.samples.setdefault(job.id, [])
            if not seen or seen[-1][1] != info["step"]:
                seen.append((time.time(), info["step"]))
                del seen[:-30]  # the last ~30 observations: the rate now, not since the model loaded
            info.update(_rate_and_eta(seen, info["steps"]))
        return info


# -- run folders ----------------------------------------------------------------------------------------------


def run_status(run: Path) -> dict:
    """run.json of a run folder ({} before the trainer wrote it)."""
    try:
        return json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def checkpoint_steps(run: Path) -> list[int]:
    from ..checkpoints import checkpoint_dirs

    return [int(p.name.split("-")[1]) for p in checkpoint_dirs(run)]


def train_progress(run: Path) -> dict:
    """What a run folder says about its training: status, step, steps, every logged series, the preview grids."""
    status = run_status(run)
    series = read_series(run)
    known = [steps[-1] for steps, _ in series.values()] + ([status["step"]] if "step" in status else [])
    step = max(known) if known else None
    previews = sorted((run / "validation").glob("step-*.png"))
    return {"status": status.get("status"), "step": step, "steps": status.get("steps"), "series": series,
            "previews": previews, "checkpoints": checkpoint_steps(run), "artefacts": status.get("artefacts", []),
            "rate": None, "eta": None}


def read_series(run: Path) -> dict[str, tuple[list[int], list[float]]]:
    """{value name: (steps, values)} of logs.jsonl, as `plot.read_log` reads it, but never failing: the last line
    may be half written (the trainer is writing it now, or was killed while writing it)."""
    from ..checkpoints import LOG_FILE

    try:
        text = (run / LOG_FILE).read_text()
    except OSError:
        return {}
    series: dict[str, tuple[list[int], list[float]]] = {}
    for line in text.splitlines(keepends=True):
        try:
            row = json.loads(line) if line.endswith("\n") else None
        except ValueError:
            row = None
        for key, value in (row or {}).items():
            if key != "step" and isinstance(value, (int, float)):
                steps, values = series.setdefault(key, ([], []))
                steps.append(row["step"])
                values.append(float(value))
    return series


def _rate_and_eta(seen: list[tuple[float, int]], steps: int | None) -> dict:
    if len(seen) < 2 or seen[-1][0] <= seen[0][0]:
        return {}
    rate = (seen[-1][1] - seen[0][1]) / (seen[-1][0] - seen[0][0])
    eta = (steps - seen[-1][1]) / rate if steps and rate > 0 else None
    return {"rate": rate, "eta": eta}


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def _without(argv: list[str], *flags: str) -> list[str]:
    """`argv` without the given flags and their values."""
    out, skip = [], False
    for token in argv:
        if skip and not token.startswith("--"):
            continue
        skip = token in flags
        if not skip:
            out.append(token)
    return out


def _alive(pid: int | None) -> bool:
    """Whether `pid` is a live personalize process (a child of an earlier UI, which this one cannot wait for)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        try:
            os.kill(pid, 0)  # no /proc (macOS): existence is all we can know
            return True
        except OSError:
            return False
    return b"personalize" in cmdline and state != "Z"


def _default_sigint() -> None:
    """In the child before exec: Ctrl-C back to its default. A UI started in the background (`nohup ... &`, a
    service) inherits SIGINT ignored, and so would every job: Stop's Ctrl-C would do nothing and the job would be
    killed after the grace period instead of saving and stopping."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signal(pid: int | None, sig: int) -> None:
    """Signal a child's whole session (its pid is its process group: start_new_session)."""
    if not pid:
        return
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
