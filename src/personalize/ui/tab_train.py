"""Steps 3 and 4 of the page: the method and its settings (fields from the CLI's dataclasses), then training
(the command, progress, loss curve, previews, stop and resume)."""

from __future__ import annotations

import re
import shlex
import sys

from nicegui import ui

from ..errors import PersonalizeError
from ..methods import METHODS
from ..trainer import default_model
from .jobs import format_eta, train_progress
from .options import Option, baseline, help_line, option_named_in, options_for, parse_value, presets
from .workspace import loader_verdict


CHART_COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c"]
LOSS_SMOOTHING = 0.9  # the loss curve's moving average (TensorBoard's slider, kohya's and OneTrainer's charts)


def method_summary(method: str) -> str:
    return (sys.modules[METHODS[method].__module__].__doc__ or method).strip().splitlines()[0]


def smoothed(values: list[float], weight: float = LOSS_SMOOTHING) -> list[float]:
    """Exponential moving average, debiased as TensorBoard's (the first points are not pulled towards 0): a
    per-step diffusion loss jumps with the random timestep, its trend is what tells whether training works."""
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


class TrainSteps:
    """The page's steps 3 and 4 (a part of `app.Page`, whose state and helpers it uses)."""

    # -- 3 settings ------------------------------------------------------------------------------------------

    def build_settings(self) -> None:
        ui.markdown("Pick a **preset** (starting values for a model size) and a **method**; every option below is a flag of "
                    "`personalize train`, with its help and default from the same code.")
        with ui.row().classes("w-full items-end gap-4"):
            choices = {"": "none: the method's own defaults", **{k: f"{k}: {v}" for k, v in presets().items()}}
            ui.select(choices, value=self.preset or "", label="Preset", on_change=self.on_preset).props("outlined dense").classes("w-[28rem]")
            self.method_select = ui.select({m: m for m in METHODS}, value=self.method, label="Method",
                                           on_change=self.on_method).props("outlined dense").classes("w-56")
            self.model_input = ui.input("Base model", value=self.model, on_change=self.on_model).props("outlined dense").classes("w-72")
        ui.label("--model · toy (built-in, CPU-sized) · tiny · a diffusers folder or .safetensors/.ckpt file in the "
                 "workspace (or under `personalize ui --model-dir`) · a hub id in your cache").classes("help")
        self.method_line = ui.label(method_summary(self.method)).classes("italic")
        self.options_view()
        self.next_button("train", "Next: train")

    def on_preset(self, e) -> None:
        from ..configs import read_preset

        self.preset = e.value or None
        if self.preset:
            values = read_preset(self.preset)
            self.method = values.get("method", self.method)
            self.model = values.get("model", self.model)
            self.method_select.set_value(self.method)
            self.model_input.set_value(self.model)
        self.values, self.errors = {}, {}
        self.options_view.refresh()
        self.after_settings_changed()

    def on_method(self, e) -> None:
        if e.value == self.method:
            return
        self.method = e.value
        if self.preset and self._preset_method() != self.method:
            self.preset = None  # a preset's options belong to its method
        self.values = {k: v for k, v in self.values.items() if k in {o.name for o in options_for(self.method)}}
        self.method_line.set_text(method_summary(self.method))
        self.options_view.refresh()
        self.after_settings_changed()

    def _preset_method(self) -> str | None:
        from ..configs import read_preset

        return read_preset(self.preset).get("method") if self.preset else None

    def on_model(self, e) -> None:
        self.model = (e.value or "").strip() or default_model()
        self.after_settings_changed()

    def after_settings_changed(self) -> None:
        self.refresh_command()
        self.images_view.refresh()  # the training size and the need for masks may have changed

    @ui.refreshable_method
    def options_view(self) -> None:
        base = baseline(self.method, self.preset)
        every = options_for(self.method)
        method_options = [o for o in every if o.owner != "TrainConfig"]
        with ui.card().classes("w-full"):
            ui.label(f"{self.method} options").classes("font-bold")
            self.option_grid(method_options, base)
        with ui.card().classes("w-full"):
            ui.label("Training loop").classes("font-bold")
            self.option_grid([o for o in every if o.owner == "TrainConfig" and o.up_front], base)
            with ui.expansion("All loop options").classes("w-full"):
                self.option_grid([o for o in every if o.owner == "TrainConfig" and not o.up_front], base)

    def option_grid(self, options: list[Option], base: dict) -> None:
        with ui.grid(columns=3).classes("w-full gap-x-6 gap-y-2"):
            for option in options:
                with ui.column().classes("gap-0"):
                    self.option_widgets[option.name] = self.option_widget(option, self.values.get(option.name, base[option.name]))
                    help_text = help_line(option, base[option.name])
                    if option.name == "validation_steps" and base[option.name] is None:
                        help_text += "; here: every steps / 5, so previews show while it trains"
                    ui.label(help_text).classes("help")

    def option_widget(self, option: Option, value):
        def changed(e, option=option):
            self.on_option(option, e.value, e.sender)

        if option.kind is bool:
            return ui.switch(option.label, value=bool(value), on_change=changed).props(f"data-option={option.name}")
        if option.choices:
            return ui.select(list(option.choices), value=value, label=option.label, on_change=changed) \
                .props(f"outlined dense data-option={option.name}").classes("w-full")
        if option.is_list:
            text = "\n".join(map(str, value or []))
            widget = ui.textarea(option.label, value=text, on_change=changed).props(f"outlined dense autogrow data-option={option.name}")
            return widget.classes("w-full").tooltip("one value per line")
        return ui.input(option.label, value="" if value is None else str(value), on_change=changed,
                        placeholder="default").props(f"outlined dense data-option={option.name}").classes("w-full")

    def on_option(self, option: Option, raw, sender) -> None:
        try:
            value = parse_value(option, raw)
        except PersonalizeError as exc:
            self.errors[option.name] = str(exc)
            sender.props(f'error error-message="{exc}"')
            self.refresh_command()
            return
        self.errors.pop(option.name, None)
        sender.props(remove="error error-message")
        if value is None or value == baseline(self.method, self.preset)[option.name]:
            self.values.pop(option.name, None)
        else:
            self.values[option.name] = value
        self.refresh_command()
        if option.name in ("resolution", "masked_loss"):
            self.images_view.refresh()

    # -- 4 train ---------------------------------------------------------------------------------------------

    def build_train(self) -> None:
        ui.markdown("Training runs in its own process: you can close this page, open it in another tab, or stop this "
                    "app — the run goes on, and comes back here when you return. The command below is exactly what runs.")
        with ui.card().classes("w-full cmd"):
            self.command = ui.code("", language="bash").classes("w-full")
        self.command_error = ui.label("").classes("text-negative")
        with ui.row().classes("items-center gap-3"):
            self.train_button = ui.button("Train", icon="play_arrow", on_click=self.start_training).props("id=train")
            ui.button("Stop", icon="stop", on_click=self.stop_training).props("outline id=stop")
            ui.button("Resume", icon="replay", on_click=self.resume_training).props("outline id=resume") \
                .tooltip("personalize train ... --resume latest: continues from the last checkpoint")
            self.overwrite = ui.switch("start over if the run folder already holds a run (--overwrite)")
        self.train_status = ui.label("").classes("text-lg").props("id=train-status")
        self.train_bar = ui.linear_progress(value=0, show_value=False).props("size=12px instant-feedback")
        with ui.row().classes("w-full gap-6 items-start"):
            self.loss_chart = ui.echart({
                "title": {"text": "loss", "textStyle": {"fontSize": 13}}, "tooltip": {"trigger": "axis"},
                "legend": {"top": 0, "right": 0}, "animation": False,
                "xAxis": {"type": "value", "name": "step"}, "yAxis": {"type": "value", "scale": True},
                "series": [],
            }).classes("w-[34rem] h-72")
            with ui.column().classes("gap-1"):
                self.preview_label = ui.label("Previews appear here as the trainer draws them.").classes("help")
                self.preview = ui.image("").classes("w-[24rem] pixelated").props("id=preview fit=contain")
                self.preview.set_visibility(False)
        with ui.expansion("Output of the command", icon="terminal").classes("w-full"):
            self.train_log = ui.label("").classes("font-mono text-xs whitespace-pre-wrap")
        self._chart_points = -1
        self.next_button("use", "Next: use it")

    def refresh_command(self) -> None:
        """The command of the form, or what `personalize train` would refuse about it: on the Train tab, and beside
        the field it is about in step 3 (the train button waits until it is put right)."""
        if not hasattr(self, "command"):
            return
        try:
            argv = self.argv()
        except PersonalizeError as exc:
            self.show_refusal(str(exc))
            return
        self.show_refusal(None)
        self.command.set_content(f"personalize {shlex.join(argv)}")

    def show_refusal(self, message: str | None) -> None:
        if self.launch_error and self.launch_error[0] not in self.errors:  # the last refusal is put right
            self._mark(self.launch_error[0], None)
        option = option_named_in(message, options_for(self.method)) if message else None
        field = option.name if option else ("model" if message and re.search(r"--model(?![-\w])", message) else None)
        self.launch_error = (field, message) if message else None
        where = f" (step 3 · Method & settings: {option.label if option else 'Base model'})" if field else ""
        self.command_error.set_text(f"personalize train would refuse this: {message}{where}" if message else "")
        self.train_button.set_enabled(message is None)
        if field and field not in self.errors:
            self._mark(field, message)

    def _mark(self, field: str | None, message: str | None) -> None:
        widget = self.model_input if field == "model" else self.option_widgets.get(field)
        if widget is None or widget.is_deleted:
            return
        if message:
            widget.props(f'error error-message="{message.replace(chr(34), chr(39))}"')
        else:
            widget.props(remove="error error-message")

    def start_training(self) -> None:
        try:
            argv = self.argv()
        except PersonalizeError as exc:
            ui.notify(str(exc), type="negative", multi_line=True)
            return
        verdict = loader_verdict(self.images, self.resolution, self.needs_masks) if self.images.is_dir() else \
            f"{self.rel(self.images)} does not exist yet: add images in step 1"
        if verdict:  # the loader's own words, before anything starts
            ui.notify(verdict, type="negative", multi_line=True)
            return
        if self.overwrite.value:
            argv.append("--overwrite")
        self.submit("train", argv, self.rel(self.run_folder))

    def train_job(self):
        return self.jobs.latest("train", self.rel(self.run_folder))

    def stop_training(self) -> None:
        job = self.train_job()
        if job and job.state in ("queued", "running"):
            self.jobs.stop(job.id)
            ui.notify("stopping: the run keeps its last checkpoint", type="warning")

    def resume_training(self) -> None:
        try:
            argv = self.jobs.resume_argv(self.rel(self.run_folder))
        except PersonalizeError as exc:
            ui.notify(str(exc), type="negative")
            return
        self.submit("train", argv, self.rel(self.run_folder))

    def update_train(self) -> None:
        job = self.train_job()
        info = self.jobs.progress(job) if job else train_progress(self.run_folder)
        step, steps = info["step"], info["steps"]
        self.train_status.set_text(self.train_words(job, info))
        self.train_bar.set_value((step or 0) / steps if steps else 0)
        loading = job is not None and job.state == "running" and step is None
        if loading:  # a moving bar while the child imports and loads: something is happening
            self.train_bar.props("indeterminate")
        else:
            self.train_bar.props(remove="indeterminate")
        if job is not None and job.state in ("queued", "running"):  # what runs, even when the form has changed since
            self.command.set_content(job.command)
        self.train_log.set_text(self.jobs.log_tail(job, 30) if job is not None else "")  # this concept's job only
        self.update_chart(info["series"])
        if info["previews"]:
            latest = info["previews"][-1]
            self.preview.set_source(self.file_url(latest))
            self.preview.set_visibility(True)
            self.preview_label.set_text(f"{self.rel(self.run_folder)}: preview at step {int(latest.stem.split('-')[1])} "
                                        "(rows: prompts, columns: seeds)")
        else:
            self.preview.set_visibility(False)
            self.preview_label.set_text("Previews appear here as the trainer draws them.")

    def train_words(self, job, info) -> str:
        step, steps = info["step"], info["steps"]
        count = f"step {step or 0} / {steps or '?'}"
        if job is None:
            return {"finished": f"finished · {count}", "running": f"{count} (started elsewhere)",
                    "stopped": f"stopped at {count}: Resume continues from its last checkpoint"}.get(
                info["status"], "No run yet: press Train.")
        if job.state == "queued":
            return "waiting for the job before it (see Jobs)"
        if job.state == "running":
            if step is None:
                return "loading the model and images…"
            if steps and step >= steps:
                return f"{count} · writing the files and drawing the last preview…"
            speed = f" · {info['rate']:.1f} steps/s · ETA {format_eta(info['eta'])}" if info.get("rate") else ""
            return f"training · {count}{speed}"
        if job.state == "finished":
            return f"finished · {count} — go to 5 · Use it"
        return f"{job.state} · {count} — {job.message}"

    def update_chart(self, series: dict) -> None:
        losses = {k: v for k, v in series.items() if not k.startswith("lr/")}
        points = sum(len(s) for s, _ in losses.values())
        if points == self._chart_points:
            return
        self._chart_points = points
        series = []
        for (name, (steps, values)), colour in zip(losses.items(), CHART_COLOURS * 4):  # each value faint, the average bold
            series.append({"name": name, "type": "line", "showSymbol": False, "data": [[s, v] for s, v in zip(steps, values)],
                           "color": colour, "lineStyle": {"opacity": 0.3, "width": 1}})
            series.append({"name": f"{name} (smoothed)", "type": "line", "showSymbol": False, "color": colour,
                           "data": [[s, v] for s, v in zip(steps, smoothed(values))], "lineStyle": {"width": 2.5}})
        self.loss_chart.options["series"] = series
        self.loss_chart.update()
