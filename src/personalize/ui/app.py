"""The page: five numbered steps in tabs — images, mask, method and settings, train, use it — and the job list.

It only wires the other modules together: the workspace checks paths and images, `options` turns the form into the
`personalize train` argv it shows, `jobs` runs every command in a child process and reads progress from its run
folder. Every tab holds its state in the page (one per browser tab) except jobs and files, which live in the
workspace and so are the same in every tab. A new tab starts with a fresh form, except while a training job is
queued or running (it opens on that job: closing the browser loses nothing); the Jobs tab's "open" loads any
training job's settings into a tab (`/?job=ID`). The steps' widgets and handlers are in `tab_images`, `tab_train` and
`tab_use`; this file has the page's state, its layout, its clock, and the server.
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
from pathlib import Path

from fastapi import HTTPException
from fastapi.responses import FileResponse, Response
from nicegui import app, ui

from ..errors import PersonalizeError
from ..methods import METHODS
from ..trainer import default_model
from .artefacts import artefacts
from .guards import BasicAuth, SameOrigin, UploadLimit, allowed_host_names
from .jobs import ACTIVE, Job, JobManager, run_status
from .masks import MaskCanvas
from .options import baseline, check_argv, options_for, presets, train_argv, with_ui_defaults
from .tab_images import ImageSteps
from .tab_train import TrainSteps
from .tab_use import UseSteps
from .workspace import Workspace, native_resolution, safe_name

# Options naming a path, and how the page confines each (the README's "reads and writes only inside --workspace"):
# models may also be built-in names, hub ids, or under `personalize ui --model-dir`; the rest stay in the workspace.
MODEL_PATHS = ("model_config", "encoder_weights")
WORKSPACE_PATHS = ("class_images", "masks")  # DreamBooth's class images (written there when short), SingleInsert's masks
CSS = """
.pixelated, .pixelated img { image-rendering: pixelated; }
.help { font-size: 0.75rem; color: #555; line-height: 1.1rem; }
.nicegui-content { max-width: 1200px; margin: 0 auto; }
.cmd pre { white-space: pre-wrap; word-break: break-all; padding-right: 2.5rem; }
.q-field--error .q-field__bottom { position: static; transform: none; }  /* a long refusal pushes the help down */
.q-field--error.q-field--with-bottom { padding-bottom: 0; }
.cmd .nicegui-code-copy { opacity: 1; background: #1e293b; color: white; }  /* NiceGUI's is 20 % opaque: unseen */
"""


class Server:
    """What every browser tab shares: the workspace, its job list, and the model the UI was started with."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self.jobs = JobManager(workspace)
        self.default_model = default_model()


def job_to_open(jobs: JobManager, requested: str | None) -> Job | None:
    """The training job a new tab opens on: the one asked for (Jobs' "open"), else the one queued or running —
    never a finished or failed job's settings (a bad --model included): with none running, a tab starts afresh."""
    if requested:
        job = next((j for j in jobs.jobs if j.id == requested and j.kind == "train"), None)
        if job is not None:
            return job
    job = jobs.latest("train")
    return job if job is not None and job.state in ACTIVE else None


# -- the page --------------------------------------------------------------------------------------------------


class Page(ImageSteps, TrainSteps, UseSteps):
    """One browser tab's page."""

    def __init__(self, server: Server, open_job: str | None = None):
        self.server, self.ws, self.jobs = server, server.workspace, server.jobs
        self.preset: str | None = "toy" if "toy" in presets() else None
        self.method, self.model = "textual-inversion", default_model()
        self.values: dict = {}  # option -> value the form set (absent: its baseline)
        self.errors: dict[str, str] = {}  # option -> why its field cannot be read
        self.rejected: list[str] = []  # uploads refused this session, with the reason
        self.concept = "my-concept"
        self.images = self.ws.uploads_dir(self.concept)
        self.canvas: MaskCanvas | None = None
        self.generation_job: str | None = None
        self.evaluation_job: str | None = None
        self._jobs_seen: list | None = None
        self.option_widgets: dict = {}  # option name -> its widget, to show a refusal beside it
        self.launch_error: tuple[str | None, str] | None = None  # (option or None, why the run would be refused)
        job = job_to_open(self.jobs, open_job)
        if job is not None:
            self._take_settings(job)
        self.build()

    # -- state -----------------------------------------------------------------------------------------------

    def _take_settings(self, job: Job) -> None:
        """This tab's form becomes the settings of a training job (the one it opens on)."""
        from .options import parse_quietly

        try:
            train_cfg, method_cfg = parse_quietly(job.argv[1:])
        except PersonalizeError:
            return
        try:
            self.images = self.ws.resolve(train_cfg.images, "image folder") if train_cfg.images else self.images
        except PersonalizeError:
            return
        self.concept = Path(job.folder).name
        self.method, self.model = train_cfg.method, train_cfg.model
        self.preset = job.argv[job.argv.index("--preset") + 1] if "--preset" in job.argv else None
        parsed, base = {**vars(train_cfg), **vars(method_cfg)}, baseline(self.method, self.preset)
        self.values = {o.name: parsed[o.name] for o in options_for(self.method) if parsed.get(o.name) != base[o.name]}

    @property
    def run_folder(self) -> Path:
        return self.ws.run_dir(self.concept)

    def rel(self, path: Path) -> str:
        return self.ws.relative(path)

    def value(self, name: str):
        return self.values.get(name, baseline(self.method, self.preset).get(name))

    @property
    def resolution(self) -> int | None:
        return self.value("resolution") or native_resolution(self.model)

    @property
    def needs_masks(self) -> bool:
        return METHODS[self.method].needs_masks or bool(self.value("masked_loss"))

    def argv(self) -> list[str]:
        """The `personalize train` argv of the form, once everything `personalize train` refuses before loading
        has been checked here, in its own words: PersonalizeError otherwise."""
        if self.errors:
            raise PersonalizeError("; ".join(self.errors.values()))
        self.check_paths()
        values = with_ui_defaults(self.method, self.preset, self.values)
        argv = train_argv(self.method, self.model, self.rel(self.images), self.rel(self.run_folder), values, self.preset)
        train_cfg, method_cfg = check_argv(argv, self.method, {**baseline(self.method, self.preset), **values})
        self.check_run(train_cfg, method_cfg)
        return argv

    def check_paths(self) -> None:
        """Every path the form names is one the page may use: see MODEL_PATHS and WORKSPACE_PATHS."""
        self.ws.check_model(self.model, "--model", started_with=self.server.default_model)
        for name in MODEL_PATHS:
            if self.values.get(name):
                self.ws.check_model(self.values[name], f"--{name.replace('_', '-')}")
        for name in WORKSPACE_PATHS:
            if self.values.get(name):
                self.ws.resolve(self.values[name], f"--{name.replace('_', '-')}")
        if self.values.get("dataset"):
            self.ws.check_dataset(self.values["dataset"])

    def check_run(self, train_cfg, method_cfg) -> None:
        """The trainer's own checks before loading (`trainer.check_run`), on the form's paths as the job, run in
        the workspace, will read them."""
        from ..trainer import check_run

        inside = {k: str(self.ws.root / v) for k in ("images", "dataset") if (v := getattr(train_cfg, k))}
        check_run(dataclasses.replace(train_cfg, **inside), method_cfg)

    # -- layout ----------------------------------------------------------------------------------------------

    def build(self) -> None:
        ui.add_css(CSS)
        with ui.header().classes("items-center bg-slate-800 text-white"):
            ui.label("personalize").classes("text-2xl font-bold")
            ui.label("teach a text-to-image model a new concept from a few images").classes("opacity-80")
            ui.space()
            self.job_chip = ui.label("").classes("text-sm")
        with ui.row().classes("w-full items-center gap-4"):
            self.concept_input = ui.input("Concept name", value=self.concept, on_change=self.on_concept).props("outlined dense").classes("w-56") \
                .tooltip("names the run folder runs/NAME and the upload folder uploads/NAME")
            self.where = ui.label().classes("text-sm text-gray-600")
        with ui.tabs().classes("w-full").props("align=left") as tabs:
            ui.tab("images", "1 · Images")
            ui.tab("mask", "2 · Mask")
            ui.tab("settings", "3 · Method & settings")
            ui.tab("train", "4 · Train")
            ui.tab("use", "5 · Use it")
            ui.tab("jobs", "Jobs")
        self.tabs = tabs
        with ui.tab_panels(tabs, value="train" if self.jobs.latest("train") else "images").classes("w-full"):
            with ui.tab_panel("images"):
                self.build_images()
            with ui.tab_panel("mask"):
                self.build_mask()
            with ui.tab_panel("settings"):
                self.build_settings()
            with ui.tab_panel("train"):
                self.build_train()
            with ui.tab_panel("use"):
                self.build_use()
            with ui.tab_panel("jobs"):
                self.build_jobs()
        self.refresh_where()
        ui.timer(1.0, self.tick)

    def next_button(self, tab: str, text: str) -> None:
        ui.button(text, icon="arrow_forward", on_click=lambda: self.tabs.set_value(tab)).props("flat")

    def refresh_where(self) -> None:
        images = f"dataset: {self.values['dataset']}" if self.values.get("dataset") else f"images: {self.rel(self.images)}"
        self.where.set_text(f"{images}   ·   run folder: {self.rel(self.run_folder)}   ·   workspace: {self.ws.root}")
        self.refresh_command()

    def on_concept(self, e) -> None:
        name = safe_name(e.value or "")
        uploads_before = self.images == self.ws.uploads_dir(self.concept)
        self.concept = name
        self._chart_points = -1  # another run folder: its own curve
        if uploads_before:
            self.images = self.ws.uploads_dir(name)
            self.images_view.refresh()
            self.mask_choices()
        self.refresh_where()

    # -- jobs --------------------------------------------------------------------------------------------------

    def submit(self, kind: str, argv: list[str], folder: str):
        try:
            job = self.jobs.submit(kind, argv, folder)
        except PersonalizeError as exc:
            ui.notify(str(exc), type="negative", multi_line=True)
            return None
        waiting = "" if job.state == "running" else f" (queued behind {self.jobs.running.kind if self.jobs.running else 'another job'})"
        ui.notify(f"started: personalize {job.argv[0]}{waiting}", type="info")
        self.tick()
        return job

    # -- the clock -------------------------------------------------------------------------------------------

    def tick(self) -> None:
        self.jobs.poll()
        running = self.jobs.running
        self.job_chip.set_text(f"running: {running.kind} {running.folder}" + (f" (+{len(self.jobs.queued)} queued)" if self.jobs.queued else "")
                               if running else "no job running")
        self.update_train()
        self.update_generation()
        self.update_evaluation()
        signature = [(j.id, j.state) for j in self.jobs.jobs]
        if signature != self._jobs_seen:  # a job started or ended: the lists that depend on finished runs too
            self._jobs_seen = signature
            self.jobs_view.refresh()
            self.files_view.refresh()
            self.fill_use_defaults()

    def file_url(self, path: Path, download: bool = False) -> str:
        stamp = int(path.stat().st_mtime * 1000) if path.exists() else 0
        return f"/files/{self.rel(path)}?v={stamp}" + ("&download=1" if download else "")


# -- the server ------------------------------------------------------------------------------------------------


def _routes(server: Server) -> None:
    """Workspace files for the page (previews, samples, reports, downloads); nothing outside the workspace."""

    def inside(path: str) -> Path:
        try:
            return server.workspace.resolve(path)
        except PersonalizeError:
            raise HTTPException(status_code=403, detail="outside the workspace") from None

    @app.get("/files/{path:path}")
    def files(path: str, download: bool = False):
        target = inside(path)
        if not target.is_file():
            raise HTTPException(status_code=404)
        return FileResponse(target, headers={"Cache-Control": "no-store"}, filename=target.name if download else None,
                            content_disposition_type="attachment" if download else "inline")

    @app.get("/zip/{path:path}")
    def zipped(path: str):
        run = inside(path)
        status = run_status(run)
        files = [f for f, _ in artefacts(run, status.get("artefacts", []))]
        if not files:
            raise HTTPException(status_code=404, detail="no finished run there")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for f in files:
                for member in ([f] if f.is_file() else sorted(p for p in f.rglob("*") if p.is_file())):
                    archive.write(member, f"{run.name}/{member.relative_to(run)}")
        return Response(buffer.getvalue(), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{run.name}.zip"'})


def serve(workspace: str, host: str = "127.0.0.1", port: int = 8080, auth: tuple[str, str] | None = None,
          max_upload_mb: float = 20, show: bool = True, allow_hosts: tuple[str, ...] = (), model_dirs: tuple[str, ...] = ()) -> None:
    """Run the UI until interrupted (jobs it started keep running)."""
    server = Server(Workspace(workspace, max_upload_mb, model_dirs))
    _routes(server)
    app.add_middleware(UploadLimit, limit=server.workspace.max_upload_bytes * 64)  # a whole batch of files at most
    if auth:
        app.add_middleware(BasicAuth, user=auth[0], password=auth[1])
    app.add_middleware(SameOrigin, allowed_hosts=allowed_host_names(host, allow_hosts))  # outermost: before anything
    app.timer(1.0, server.jobs.poll)  # queued jobs start even with no page open

    @ui.page("/", title="personalize")
    def index(job: str | None = None):
        Page(server, open_job=job)

    if host not in ("127.0.0.1", "localhost", "::1") and not auth:
        print(f"warning: --host {host} without --auth: anyone who can reach this port can train and read the workspace")
    print(f"personalize ui: http://{host}:{port}  (workspace {server.workspace.root}; Ctrl-C stops the UI, not its jobs)")
    ui.run(host=host, port=port, title="personalize", show=show, reload=False, show_welcome_message=False,
           favicon="🎨", uvicorn_logging_level="warning")
