"""Step 5 of the page — generate, compose, evaluate, download — and the job list."""

from __future__ import annotations

import time
from pathlib import Path

from nicegui import ui

from ..errors import PersonalizeError
from ..generate import run_settings
from ..methods import METHODS
from .artefacts import artefacts
from .jobs import format_eta, run_status
from ..generate import SAMPLERS
from .options import Option, dataclass_options, flag_tokens, help_line, parse_value
from .workspace import safe_name

def generate_argv(concepts: list[tuple[str, str]], prompts: list[str], output: str, seed: int = 0, count: int = 1,
                  **optional: str) -> list[str]:
    """`personalize generate` argv: each (run folder, token to give it: '' = its own), the prompts, and the optional
    settings the form leaves empty for the model's own (steps, guidance, negative_prompt, resolution, sampler)."""
    argv = ["generate"]
    for folder, _ in concepts:
        argv += ["--concept", folder]
    if len(concepts) > 1:
        for _, token in concepts:
            argv += ["--token", token]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    argv += ["--seed", str(seed), "--num-images", str(count)]
    for name, value in optional.items():
        if (value or "").strip():
            argv += [f"--{name.replace('_', '-')}", value.strip()]
    return [*argv, "--output", output]


def duration(job, now: float | None = None) -> str:
    """How long a job ran (or has been running): "1:05"; "" before it starts."""
    if job.started is None:
        return ""
    return format_eta((job.ended or now or time.time()) - job.started)


STATE_COLOURS = {"queued": "grey", "running": "primary", "finished": "positive", "failed": "negative", "stopped": "warning"}


class UseSteps:
    """The page's step 5 and its Jobs tab (a part of `app.Page`, whose state and helpers it uses)."""

    # -- 5 use it --------------------------------------------------------------------------------------------

    def build_use(self) -> None:
        ui.markdown("Draw with the learned concept, combine two concepts, measure it, and take its files elsewhere.")
        with ui.card().classes("w-full"):
            ui.label("Generate").classes("font-bold")
            self.prompts = ui.textarea("Prompts (one per line)", value="").props("outlined autogrow id=prompts").classes("w-full")
            with ui.row().classes("items-end gap-3"):
                self.seed = ui.number("First seed", value=0, precision=0).props("outlined dense").classes("w-32")
                self.count = ui.number("Images per prompt", value=4, min=1, max=64, precision=0).props("outlined dense").classes("w-40")
                self.gen_steps = ui.input("Sampler steps", placeholder="model's").props("outlined dense").classes("w-32")
                self.gen_guidance = ui.input("Guidance", placeholder="model's").props("outlined dense").classes("w-32")
                self.gen_size = ui.input("Size (px)", placeholder="model's").props("outlined dense").classes("w-32") \
                    .tooltip("--resolution: the side of the square image")
                self.gen_sampler = ui.select({"": "model's", **{name: name for name in SAMPLERS}}, value="",
                                             label="Sampler").props("outlined dense").classes("w-32")
            self.gen_negative = ui.input("Negative prompt", placeholder="none").props("outlined dense id=negative").classes("w-full")
            with ui.row().classes("items-end gap-3"):
                self.second = ui.select({}, label="Compose with a second concept (optional)", clearable=True,
                                        on_change=self.on_second).props("outlined dense").classes("w-80")
                self.second_token = ui.input("its token in prompts", placeholder="its own").props("outlined dense").classes("w-48")
            ui.button("Generate", icon="brush", on_click=self.generate).props("id=generate")
            self.gen_command = ui.label("").classes("font-mono text-xs whitespace-pre-wrap")
            self.gallery = ui.row().classes("gap-2").props("id=gallery")
        with ui.card().classes("w-full"):
            ui.label("Evaluate").classes("font-bold")
            self.eval_view()
        with ui.card().classes("w-full"):
            ui.label("Files").classes("font-bold")
            self.files_view()
        self.fill_use_defaults()

    def fill_use_defaults(self) -> None:
        """The prompt that names the concept as it was trained, and the other finished runs to compose with."""
        settings = run_settings(self.run_folder)
        if settings and not self.prompts.value:
            self.prompts.set_value(f"a {self.subject(settings)}")
        others = {self.rel(r): self.rel(r) for r in self.ws.runs()
                  if r != self.run_folder and run_status(r).get("status") == "finished"}
        self.second.set_options(others)

    def subject(self, settings: dict, token: str | None = None) -> str:
        method = METHODS.get(settings.get("method") or "")
        settings = {**settings, "token": token or settings.get("token")}
        return method.prompt_subject(settings) if method else settings.get("token") or "<concept>"

    def on_second(self, e) -> None:
        if not e.value:
            return
        mine, theirs = run_settings(self.run_folder), run_settings(self.ws.resolve(e.value))
        if theirs.get("token") and theirs.get("token") == mine.get("token"):  # one placeholder cannot mean two concepts
            self.second_token.set_value(f"<{safe_name(Path(e.value).name)}>")
        token = self.second_token.value or None
        self.prompts.set_value(f"a {self.subject(mine)} and a {self.subject(theirs, token)}")

    def generate(self) -> None:
        prompts = [p.strip() for p in (self.prompts.value or "").splitlines() if p.strip()]
        if not prompts:
            ui.notify("write a prompt first", type="warning")
            return
        if run_status(self.run_folder).get("status") != "finished":
            ui.notify(f"{self.rel(self.run_folder)} has no finished run yet: train it in step 4", type="warning")
            return
        out = self.run_folder / "samples" / time.strftime("%Y%m%d-%H%M%S")
        concepts = [(self.rel(self.run_folder), "")] + ([(self.second.value, self.second_token.value or "")] if self.second.value else [])
        argv = generate_argv(concepts, prompts, self.rel(out), int(self.seed.value or 0), int(self.count.value or 1),
                             steps=self.gen_steps.value, guidance=self.gen_guidance.value,
                             negative_prompt=self.gen_negative.value, resolution=self.gen_size.value,
                             sampler=self.gen_sampler.value)
        job = self.submit("generate", argv, self.rel(out))
        if job:
            self.generation_job = job.id
            self.gen_command.set_text(job.command)

    def update_generation(self) -> None:
        if not self.generation_job:
            return
        job = self.jobs.get(self.generation_job)
        if job.state in ("queued", "running"):
            latest = self.jobs.log_tail(job, 1) if job.state == "running" else ""
            self.gen_command.set_text(f"{job.state}: {job.command}" + (f"\n{latest}" if latest else ""))
            return
        self.generation_job = None
        if job.state != "finished":
            self.gen_command.set_text(f"{job.state}: {job.message}")
            return
        self.gen_command.set_text(job.command)
        folder = self.ws.root / job.folder
        self.gallery.clear()
        with self.gallery:
            for path in sorted(folder.glob("*.png")):
                if path.name == "grid.png":
                    continue
                with ui.column().classes("gap-0 items-center"):
                    ui.image(self.file_url(path)).classes("w-40 h-40 pixelated").props("fit=contain")
                    ui.link(path.name, self.file_url(path, download=True)).classes("text-xs")
            ui.link("grid.png", self.file_url(folder / "grid.png", download=True)).classes("text-xs self-end")

    @ui.refreshable_method
    def eval_view(self) -> None:
        from ..evaluate.runner import EvalConfig

        options = [o for o in dataclass_options(EvalConfig) if o.name not in ("concept", "output", "model", "model_config")]
        protocol = next(o for o in options if o.name == "protocol")
        with ui.row().classes("items-end gap-3"):
            self.protocol = ui.select(list(protocol.choices), value="toy", label="Protocol (--protocol)").props("outlined dense").classes("w-48")
            ui.button("Evaluate", icon="insights", on_click=lambda: self.evaluate(options)).props("id=evaluate")
        ui.label("toy: the toy judge scores the toy model's images (no downloads); the paper protocols need the metric "
                 "networks below (CLIP, DINO, Inception, AlexNet-LPIPS weights you have).").classes("help")
        self.eval_values: dict = {}
        with ui.expansion("Evaluation options").classes("w-full"):
            with ui.grid(columns=3).classes("w-full gap-x-6 gap-y-2"):
                for option in options:
                    if option.name == "protocol":
                        continue
                    with ui.column().classes("gap-0"):
                        self.eval_widget(option)
                        ui.label(help_line(option, option.default)).classes("help")
        self.eval_status = ui.label("").classes("font-mono text-xs whitespace-pre-wrap")
        self.report = ui.column().classes("w-full")
        self.show_report()

    def eval_widget(self, option: Option) -> None:
        def changed(e, option=option):
            try:
                value = parse_value(option, e.value)
            except PersonalizeError as exc:
                ui.notify(str(exc), type="negative")
                return
            self.eval_values[option.name] = value

        if option.kind is bool:
            ui.switch(option.label, value=bool(option.default), on_change=changed)
        elif option.choices:
            ui.select(list(option.choices), value=option.default, label=option.label, on_change=changed).props("outlined dense")
        else:
            ui.input(option.label, value="" if option.default is None else str(option.default), on_change=changed) \
                .props("outlined dense").classes("w-full")

    def eval_folder(self) -> Path:
        return self.run_folder / f"eval-{self.protocol.value}"

    def evaluate(self, options: list[Option]) -> None:
        if run_status(self.run_folder).get("status") != "finished":
            ui.notify(f"{self.rel(self.run_folder)} has no finished run yet", type="warning")
            return
        argv = ["evaluate", "--protocol", self.protocol.value, "--concept", self.rel(self.run_folder),
                "--output", self.rel(self.eval_folder())]
        for option in options:
            value = self.eval_values.get(option.name)
            if option.name != "protocol" and value is not None and value != option.default:
                argv += flag_tokens(option, value)
        job = self.submit("evaluate", argv, self.rel(self.eval_folder()))
        if job:
            self.evaluation_job = job.id

    def update_evaluation(self) -> None:
        if not self.evaluation_job:
            return
        job = self.jobs.get(self.evaluation_job)
        latest = self.jobs.log_tail(job, 1) if job.state == "running" else job.message
        self.eval_status.set_text(f"{job.state}: {job.command}" + (f"\n{latest}" if latest else ""))
        if job.state not in ("queued", "running"):
            self.evaluation_job = None
            self.show_report()

    def show_report(self) -> None:
        html = self.eval_folder() / "report.html"
        self.report.clear()
        if not html.is_file():
            return
        with self.report:
            ui.link("open the report in a new tab", self.file_url(html), new_tab=True)
            ui.element("iframe").props(f'src="{self.file_url(html)}"').classes("w-full h-[40rem] border")

    @ui.refreshable_method
    def files_view(self) -> None:
        status = run_status(self.run_folder)
        token = run_settings(self.run_folder).get("token")
        files = artefacts(self.run_folder, status.get("artefacts", []), token) if status.get("status") == "finished" else []
        if not files:
            ui.label("The run's files appear here when it has finished.").classes("text-gray-500")
            return
        ui.button("Download all (zip)", icon="download",
                  on_click=lambda: ui.download(f"/zip/{self.rel(self.run_folder)}")).props("outline")
        with ui.grid(columns=2).classes("gap-x-6 gap-y-1 items-center"):
            for path, where in files:
                ui.link(path.name, self.file_url(path, download=True)).classes("font-mono")
                ui.label(where.replace("RUN_FOLDER", self.rel(self.run_folder))).classes("help")

    # -- jobs ------------------------------------------------------------------------------------------------

    def build_jobs(self) -> None:
        ui.markdown("One job runs at a time; the others wait their turn. Every job is a `personalize` command run in the "
                    "workspace folder, with its output kept in `.personalize-ui/`.")
        self.jobs_view()

    @ui.refreshable_method
    def jobs_view(self) -> None:
        for job in reversed(self.jobs.jobs[-30:]):
            with ui.card().classes("w-full p-2"):
                with ui.row().classes("items-center gap-3"):
                    ui.badge(job.state, color=STATE_COLOURS.get(job.state, "grey"))
                    ui.label(job.kind).classes("font-bold")
                    ui.label(time.strftime("%H:%M:%S", time.localtime(job.created))).classes("help")
                    took = duration(job)
                    if took:
                        ui.label(f"{'running for' if job.state == 'running' else 'took'} {took}").classes("help")
                    if job.state in ("queued", "running"):
                        ui.button("stop", on_click=lambda j=job: self.jobs.stop(j.id)).props("flat dense size=sm")
                    if job.kind == "train":
                        ui.button("open", on_click=lambda j=job: ui.navigate.to(f"/?job={j.id}")).props("flat dense size=sm") \
                            .tooltip("this job's concept and settings in this tab")
                ui.label(job.command).classes("font-mono text-xs break-all")
                if job.message:
                    colour = "text-negative" if job.state == "failed" else "text-gray-600"
                    ui.label(job.message).classes(f"text-xs {colour} whitespace-pre-wrap")
                with ui.expansion("log").classes("w-full text-xs").props("dense") as log:
                    text = ui.label("").classes("font-mono text-xs whitespace-pre-wrap")
                log.on_value_change(lambda e, j=job, text=text: text.set_text(self.jobs.log_tail(j, 200) if e.value else ""))
