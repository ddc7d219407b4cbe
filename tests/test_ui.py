"""The web UI's parts without a browser: the form is the CLI's flags, paths stay in the workspace, uploads go through
the CLI's loader, masks are the files the trainer reads, jobs run as child processes and survive their UI."""

import argparse
import io
import json
import os
import signal
import stat
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("nicegui", reason="the UI's extra: pip install -e '.[ui]'")

from personalize.errors import PersonalizeError  # noqa: E402
from personalize.ui import options as O  # noqa: E402
from personalize.ui.jobs import JobManager, Job, format_eta, train_progress  # noqa: E402
from personalize.ui.workspace import Workspace, describe_image, inspect_folder, loader_verdict  # noqa: E402


def png_bytes(size=(48, 48), colour="blue", mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


# -- the form is the CLI ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["textual-inversion", "batex", "dreambooth-lora", "dis2booth", "singleinsert"])
def test_the_form_has_exactly_the_flags_of_personalize_train(method):
    """No second list of options: every dataclass flag of `personalize train` is a field, and nothing else."""
    from personalize.configs import add_dataclass_flags
    from personalize.methods import METHODS
    from personalize.trainer import TrainConfig

    parser, seen = argparse.ArgumentParser(), set()
    add_dataclass_flags(parser, TrainConfig, seen)
    add_dataclass_flags(parser, METHODS[method].config_class, seen)
    fields = {o.name for o in O.options_for(method)}
    assert fields == seen - set(O.OWN_WIDGETS)
    flags = {s for a in parser._actions for s in a.option_strings}
    assert all(o.flag in flags for o in O.options_for(method))


def test_the_command_means_what_the_form_shows_for_every_kind_of_field():
    values = {"steps": 20, "lr": 0.002, "flip": False, "lr_scheduler": "cosine", "validation_prompts": ["a <c>", "a <c> on pink"],
              "init_word": "star", "templates": "style", "num_vectors": 2}
    argv = O.train_argv("textual-inversion", "toy", "imgs", "runs/star", values)
    assert argv[:3] == ["train", "--method", "textual-inversion"] and "--no-flip" in argv
    assert argv[argv.index("--validation-prompts") + 1 : argv.index("--validation-prompts") + 3] == ["a <c>", "a <c> on pink"]
    O.check_argv(argv, "textual-inversion", values)  # parsed back by build_configs: the same values
    with pytest.raises(PersonalizeError, match="--steps"):
        O.check_argv(argv, "textual-inversion", {**values, "steps": 21})


@pytest.mark.parametrize("method, mirrors", [("textual-inversion", True), ("dreambooth-lora", False)])
def test_a_switch_that_defers_to_the_method_shows_the_methods_default_and_passes_only_a_change(method, mirrors):
    assert O.baseline(method, None)["flip"] is mirrors  # the switch shows what the run will do
    assert not any("flip" in token for token in O.train_argv(method, "toy", "imgs", "out", {"flip": mirrors}))
    assert ("--flip" if not mirrors else "--no-flip") in O.train_argv(method, "toy", "imgs", "out", {"flip": not mirrors})


def test_a_preset_is_named_in_the_command_and_only_changes_from_it_become_flags():
    base = O.baseline("textual-inversion", "toy")
    assert base["lr"] == 5e-3 and base["steps"] == 300  # the preset file's values, not the dataclass's
    argv = O.train_argv("textual-inversion", "toy", "imgs", "out", {"lr": 5e-3, "steps": 20}, preset="toy")
    assert "--preset" in argv and "--lr" not in argv and argv[argv.index("--steps") + 1] == "20"
    O.check_argv(argv, "textual-inversion", {**base, "steps": 20})


def test_each_field_says_its_help_and_its_default_from_the_dataclass_or_the_preset():
    by_name = {o.name: o for o in O.options_for("textual-inversion")}
    base = O.baseline("textual-inversion", "toy")
    assert O.help_line(by_name["num_vectors"], base["num_vectors"]) == f"--num-vectors · {by_name['num_vectors'].help} (default: 1)"
    assert O.help_line(by_name["lr"], base["lr"]).endswith("(default: 0.005, from the preset)")
    assert O.help_line(by_name["batch_size"], None) == f"--batch-size · {by_name['batch_size'].help}"  # its help says what decides it


@pytest.mark.parametrize("method", ["textual-inversion", "dis2booth", "singleinsert"])
def test_fields_are_labelled_in_words_and_say_their_default_once(method):
    """Issue 24.6: labels were raw flags, and "(default: the method's) (default: 300, from the preset)" doubled."""
    by_name = {o.name: o for o in O.options_for(method)}
    base = O.baseline(method, "toy" if method == "textual-inversion" else None)
    assert by_name["steps"].label == "Steps" and by_name["lr"].label == "Learning rate"
    assert all(not o.label.startswith("-") for o in by_name.values())
    for option in by_name.values():
        line = O.help_line(option, base[option.name])
        assert line.startswith(option.flag + " · ") and line.count("(default:") <= 1, line
    if method == "textual-inversion":
        assert O.help_line(by_name["steps"], base["steps"]) == "--steps · training steps (default: 300, from the preset)"


def test_field_values_are_read_with_the_options_types_and_refused_with_the_flag_named():
    by_name = {o.name: o for o in O.options_for("batex")}
    assert O.parse_value(by_name["steps"], "20") == 20 and O.parse_value(by_name["lr"], " 1e-3 ") == 1e-3
    assert O.parse_value(by_name["steps"], "") is None  # empty: the baseline applies
    assert O.parse_value(by_name["validation_prompts"], "a\n\nb\n") == ["a", "b"]
    with pytest.raises(PersonalizeError, match="--steps: 'many'"):
        O.parse_value(by_name["steps"], "many")
    with pytest.raises(PersonalizeError, match="--distance"):
        O.parse_value(by_name["distance"], "manhattan")


def test_the_dataset_field_trains_from_its_file_without_images():
    """Issue 24.6: the UI always added --images, which the trainer refuses beside --dataset."""
    argv = O.train_argv("textual-inversion", "toy", "uploads/x", "runs/x", {"dataset": "sets.toml", "init_word": "star"})
    assert "--images" not in argv and argv[argv.index("--dataset") + 1] == "sets.toml"
    O.check_argv(argv, "textual-inversion", {"dataset": "sets.toml"})


def test_bad_form_values_come_back_as_a_message_not_argparse_usage(capsys):
    """Issue 24.6: a refused value printed argparse's usage into the server's terminal."""
    argv = O.train_argv("dreambooth-lora", "toy", "imgs", "out", {}) + ["--rank", "many"]
    with pytest.raises(PersonalizeError, match="--rank: invalid int value: 'many'"):
        O.check_argv(argv, "dreambooth-lora", {})
    assert capsys.readouterr().err == ""


def test_what_personalize_train_refuses_is_known_before_launch_and_names_its_field(tmp_path):
    """Issue 24.6: Train was accepted without an init word, then the job loaded for ~8 s and failed. The trainer's
    own checks (`trainer.check_run`, the methods' `check`) run before anything loads, for the CLI and the UI."""
    from personalize.configs import build_configs
    from personalize.trainer import check_run

    argv = O.train_argv("textual-inversion", "no-such/model", str(tmp_path), str(tmp_path / "out"), {})
    train_cfg, method_cfg = build_configs(argv[1:])
    started = time.process_time()
    with pytest.raises(PersonalizeError, match="--init-word is required") as refused:
        check_run(train_cfg, method_cfg)  # no model is loaded: a missing one would fail differently
    assert O.option_named_in(str(refused.value), O.options_for("textual-inversion")).name == "init_word"
    for method, flag in (("dreambooth-lora", "--class-word"), ("singleinsert", "--class-word")):
        cfgs = build_configs(O.train_argv(method, "toy", str(tmp_path), str(tmp_path / "out"), {})[1:])
        with pytest.raises(PersonalizeError, match=flag):
            check_run(*cfgs)
    check_run(*build_configs([*argv[1:], "--init-word", "star"]))
    assert time.process_time() - started < 5  # (a generous bound on CPU time: nothing was loaded)


def test_the_ui_previews_while_it_trains_unless_told_otherwise():
    """Issue 24.6: the CLI's default draws one preview, at the end; the page would show nothing until then."""
    assert O.with_ui_defaults("textual-inversion", "toy", {})["validation_steps"] == 60  # 300 steps / 5
    assert O.with_ui_defaults("textual-inversion", "toy", {"steps": 20})["validation_steps"] == 4
    assert O.with_ui_defaults("textual-inversion", None, {"validation_steps": 7})["validation_steps"] == 7


def test_a_new_tab_starts_afresh_unless_a_training_job_is_running_or_asked_for(tmp_path):
    """Issue 24.6: a new tab took over the last job's settings, a failed job's bad --model included."""
    from personalize.ui.app import job_to_open

    jobs = JobManager(Workspace(tmp_path), python=fake_python(tmp_path, "true"))
    failed = Job("f", "train", ["train", "--model", "no/such"], "runs/a", state="failed")
    jobs.jobs.append(failed)
    assert job_to_open(jobs, None) is None
    assert job_to_open(jobs, "f") is failed  # the Jobs tab's "open"
    running = Job("r", "train", ["train"], "runs/b", state="running", pid=os.getpid())
    jobs.jobs.append(running)
    assert job_to_open(jobs, None) is running  # a closed browser loses nothing


def test_the_loss_curve_is_smoothed_as_tensorboard_does():
    from personalize.ui.tab_train import smoothed

    noisy = [1.0, 0.0] * 50
    curve = smoothed(noisy)
    assert curve[0] == 1.0 and abs(curve[-1] - 0.5) < 0.06 and max(curve[20:]) - min(curve[20:]) < 0.15


def test_generate_takes_a_negative_prompt_size_steps_and_guidance():
    from personalize.ui.tab_use import generate_argv

    argv = generate_argv([("runs/a", ""), ("runs/b", "<b>")], ["a <concept>"], "runs/a/samples/1", seed=3, count=2,
                         steps="20", guidance="", negative_prompt="blurry", resolution="512", sampler="euler-a")
    assert argv == ["generate", "--concept", "runs/a", "--concept", "runs/b", "--token", "", "--token", "<b>",
                    "--prompt", "a <concept>", "--seed", "3", "--num-images", "2", "--steps", "20",
                    "--negative-prompt", "blurry", "--resolution", "512", "--sampler", "euler-a",
                    "--output", "runs/a/samples/1"]


def test_each_job_says_how_long_it_took():
    from personalize.ui.tab_use import duration

    assert duration(Job("x", "train", [], "a", started=100.0, ended=165.0)) == "1:05"
    assert duration(Job("x", "train", [], "a", started=100.0), now=110.0) == "0:10"
    assert duration(Job("x", "train", [], "a")) == ""


# -- the workspace ------------------------------------------------------------------------------------------------


def test_the_page_names_models_and_datasets_only_in_the_workspace_or_given_at_start(tmp_path):
    """Issue 24.6: --model /etc, --model-config /etc and --dataset /etc/passwd were accepted from the page."""
    models = tmp_path / "models"
    (models / "sd15").mkdir(parents=True)
    ws = Workspace(tmp_path / "ws", model_dirs=(str(models),))
    for spec in ("toy", "tiny-xl", "random:sd15", "runwayml/stable-diffusion-v1-5", str(models / "sd15"), "in-workspace"):
        ws.check_model(spec)
    ws.check_model("/opt/started-with", started_with="/opt/started-with")  # PERSONALIZE_MODEL, when the UI started
    for spec in ("/etc", "../models/../..", str(tmp_path), "~/x.safetensors"):
        with pytest.raises(PersonalizeError, match="outside the workspace"):
            ws.check_model(spec, "--model-config")
    with pytest.raises(PersonalizeError, match="outside the workspace"):
        ws.check_dataset("/etc/passwd")
    (ws.root / "sets.toml").write_text('[[subsets]]\nimages = "../../elsewhere"\n')
    with pytest.raises(PersonalizeError, match="outside the workspace"):
        ws.check_dataset("sets.toml")
    (ws.root / "sets.toml").write_text('[[subsets]]\nimages = "uploads/a"\n')
    assert ws.check_dataset("sets.toml") == ws.root / "sets.toml"


def test_captions_are_edited_as_the_file_the_loader_reads(tmp_path):
    ws = Workspace(tmp_path / "ws")
    image = ws.save_upload("star", "0.png", png_bytes())
    caption = ws.save_caption(image, "  a photo of sks star \n")
    assert caption == image.with_suffix(".txt") and caption.read_text() == "a photo of sks star\n"
    assert "caption: 'a photo of sks star'" in describe_image(image, 32).notes
    ws.save_caption(image, "")
    assert not caption.exists()
    outside = tmp_path / "x.png"
    outside.write_bytes(png_bytes())
    with pytest.raises(PersonalizeError, match="outside the workspace"):
        ws.save_caption(outside, "no")


def test_paths_outside_the_workspace_are_refused(tmp_path):
    ws = Workspace(tmp_path / "ws")
    (tmp_path / "secret").mkdir()
    (ws.root / "link").symlink_to(tmp_path / "secret")
    assert ws.resolve("runs/star") == ws.root / "runs" / "star"
    assert ws.resolve(str(ws.root / "runs")) == ws.root / "runs"
    for escape in ("../secret", str(tmp_path / "secret"), "runs/../../secret", "link/x", "/etc"):
        with pytest.raises(PersonalizeError, match="outside the workspace"):
            ws.resolve(escape, "run folder")


def test_uploads_are_kept_only_when_the_clis_loader_reads_them(tmp_path):
    ws = Workspace(tmp_path, max_upload_mb=0.01)
    kept = ws.save_upload("my star", "../../000.png", png_bytes())
    assert kept == ws.root / "uploads" / "my-star" / "000.png" and kept.is_file()
    with pytest.raises(PersonalizeError, match="broken.png: cannot be read as an image"):
        ws.save_upload("my star", "broken.png", png_bytes()[:60])
    with pytest.raises(PersonalizeError, match="over the upload limit"):
        ws.save_upload("my star", "big.png", os.urandom(20_000))
    with pytest.raises(PersonalizeError, match="not an image file"):
        ws.save_upload("my star", "notes.pdf", b"%PDF")
    assert sorted(p.name for p in (ws.root / "uploads" / "my-star").iterdir()) == ["000.png"]  # nothing else kept


def test_each_image_says_what_the_loader_will_do_and_each_bad_file_why(tmp_path):
    wide = Image.new("RGB", (96, 48), "red")
    exif = wide.getexif()
    exif[0x0112] = 6  # stored sideways: the loader turns it upright
    wide.save(tmp_path / "a-wide.jpg", exif=exif)
    Image.new("RGBA", (64, 64), (0, 0, 255, 128)).save(tmp_path / "b-cutout.png")
    Image.new("RGB", (16, 16), "green").save(tmp_path / "c-small.png")
    (tmp_path / "d-broken.png").write_bytes(png_bytes()[:50])
    (tmp_path / "e-notes.pdf").write_bytes(b"%PDF")
    (tmp_path / "b-cutout.txt").write_text("a blue square")
    reports = {r.path.name: r for r in inspect_folder(tmp_path, resolution=32)}
    wide_notes = " ".join(reports["a-wide.jpg"].notes)
    assert "48×96" in wide_notes and "EXIF orientation 6" in wide_notes and "cut on the top and bottom" in wide_notes
    assert reports["a-wide.jpg"].preview.size == (32, 32)  # the square the model trains on
    assert any("transparency" in n for n in reports["b-cutout.png"].notes)
    assert any("caption: 'a blue square'" in n for n in reports["b-cutout.png"].notes)
    assert reports["c-small.png"].status == "warning" and "upscaled" in " ".join(reports["c-small.png"].notes)
    assert reports["d-broken.png"].status == "bad" and "cannot be read" in reports["d-broken.png"].notes[0]
    assert reports["e-notes.pdf"].status == "skipped"
    assert "d-broken.png" in loader_verdict(tmp_path, 32, needs_mask=False)  # the CLI's own words, before training
    assert "no mask yet" in " ".join(describe_image(tmp_path / "c-small.png", 32, needs_mask=True).notes)


# -- masks ----------------------------------------------------------------------------------------------------------


def test_a_drawn_mask_is_the_file_the_trainer_reads(tmp_path):
    from personalize.data import load_image_folder
    from personalize.ui.masks import MaskCanvas

    Image.new("RGB", (80, 40), "white").save(tmp_path / "0.png")
    canvas = MaskCanvas(tmp_path / "0.png")
    canvas.paint(10, 20, 4)
    canvas.paint(30, 20, 4, continue_stroke=True)  # a drag: the dabs between are filled in
    assert canvas.mask[20, 20] and not canvas.mask[2, 70]
    saved = canvas.save()
    assert saved.name == "0.mask.png" and Image.open(saved).size == (80, 40)
    (image,) = load_image_folder(tmp_path, 32, masks=True)  # what `personalize train` makes of it
    assert 0 < image.mask.mean() < 1
    again = MaskCanvas(tmp_path / "0.png")  # an existing mask is loaded for correcting
    assert again.mask[20, 20] and again.coverage == pytest.approx(canvas.coverage)


def test_the_flat_background_guess_finds_a_toy_object():
    from personalize.ui.masks import MaskCanvas

    example = Path(__file__).resolve().parent.parent / "examples" / "blue-striped-star" / "000.png"
    canvas = MaskCanvas(example)
    canvas.guess_flat_background()
    assert 0.02 < canvas.coverage < 0.6 and canvas.composite().size == canvas.size


# -- jobs -----------------------------------------------------------------------------------------------------------


def fake_python(tmp_path, body: str) -> str:
    """A stand-in for `python -m personalize.cli ARGV`: a shell script, so job tests take milliseconds."""
    script = tmp_path / "fake-python"
    script.write_text(f"#!/bin/sh\nshift 2\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def wait_until(manager, condition, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        manager.poll()
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_one_job_runs_at_a_time_and_the_next_starts_when_it_ends(tmp_path):
    ws = Workspace(tmp_path)
    jobs = JobManager(ws, python=fake_python(tmp_path, 'echo "running $@"; sleep 0.3'))
    first, second = jobs.submit("generate", ["generate", "--output", "a"], "a"), jobs.submit("generate", ["generate"], "b")
    assert (first.state, second.state) == ("running", "queued")
    wait_until(jobs, lambda: second.state == "finished")
    assert first.state == "finished" and "running generate --output a" in jobs.log_tail(first)
    assert first.command == "personalize generate --output a"
    assert [j.state for j in JobManager(ws).jobs] == ["finished", "finished"]  # the list is kept in the workspace
    with pytest.raises(PersonalizeError, match="already has a running"):
        jobs.submit("train", ["train"], "c") and jobs.submit("train", ["train"], "c")


def test_a_failed_job_says_why_in_the_clis_words(tmp_path):
    jobs = JobManager(Workspace(tmp_path), python=fake_python(tmp_path, 'echo "loading"; echo "error: --images is required" >&2; exit 2'))
    job = jobs.submit("train", ["train"], "runs/x")
    wait_until(jobs, lambda: job.state != "running")
    assert job.state == "failed" and job.message == "--images is required"


def test_stop_sends_ctrl_c_and_a_queued_job_is_dropped(tmp_path):
    import signal

    jobs = JobManager(Workspace(tmp_path), python=fake_python(tmp_path, "exec sleep 30"))
    # As in a UI started with `nohup ... &`: SIGINT ignored, which a child inherits unless the job manager resets it.
    saved = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        running, waiting = jobs.submit("train", ["train"], "runs/a"), jobs.submit("train", ["train"], "runs/b")
    finally:
        signal.signal(signal.SIGINT, saved)
    jobs.stop(waiting.id)
    assert waiting.state == "stopped"
    jobs.stop(running.id)
    wait_until(jobs, lambda: running.state != "running")
    assert running.state == "stopped" and "before its first checkpoint" in running.message


def test_a_job_outlives_its_ui_and_a_new_ui_finds_it(tmp_path):
    """The child runs in a session of its own; a UI started later watches it by pid and notices its end."""
    ws = Workspace(tmp_path)
    jobs = JobManager(ws, python=fake_python(tmp_path, "sleep 30"))  # the shell stays: its command line names personalize
    job = jobs.submit("train", ["train", "--output", "runs/a"], "runs/a")
    assert os.getpgid(job.pid) == job.pid  # its own process group: a Ctrl-C of the UI does not reach it
    del jobs  # the UI is gone; the child is not
    later = JobManager(ws)
    assert later.get(job.id).state == "running"
    (ws.root / "runs" / "a").mkdir(parents=True)
    (ws.root / "runs" / "a" / "run.json").write_text(json.dumps({"status": "finished", "step": 3, "steps": 3}))
    os.killpg(job.pid, signal.SIGTERM)
    os.waitpid(job.pid, 0)  # (this test's process is still its parent: reap it, as init would)
    later.poll()
    assert later.get(job.id).state == "finished"  # from the run folder: it got to the end


def test_resume_is_the_same_command_with_resume_latest_and_never_overwrite(tmp_path):
    ws = Workspace(tmp_path)
    jobs = JobManager(ws, python=fake_python(tmp_path, "true"))
    jobs.jobs.append(Job("x", "train", ["train", "--method", "batex", "--overwrite", "--output", "runs/a"], "runs/a", state="stopped"))
    assert jobs.resume_argv("runs/a") == ["train", "--method", "batex", "--output", "runs/a", "--resume", "latest"]
    (ws.root / "runs" / "cli").mkdir(parents=True)
    (ws.root / "runs" / "cli" / "config.yaml").write_text("method: batex\n")
    assert jobs.resume_argv("runs/cli") == ["train", "--config", "runs/cli/config.yaml", "--output", "runs/cli", "--resume", "latest"]
    with pytest.raises(PersonalizeError, match="no run"):
        jobs.resume_argv("runs/none")


def test_progress_is_read_from_the_run_folder(tmp_path):
    run = tmp_path / "run"
    (run / "validation").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"status": "running", "step": 0, "steps": 20}))
    (run / "logs.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s, "lr/vectors": 0.1}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    Image.new("RGB", (8, 8)).save(run / "validation" / "step-000002.png")
    info = train_progress(run)
    assert (info["status"], info["step"], info["steps"]) == ("running", 3, 20)
    assert info["series"]["loss"][0] == [1, 2, 3] and [p.name for p in info["previews"]] == ["step-000002.png"]
    assert train_progress(tmp_path / "nothing")["step"] is None
    assert format_eta(75) == "1:15" and format_eta(3725) == "1:02:05" and format_eta(None) == "–"


# -- the rest ---------------------------------------------------------------------------------------------------------


def test_every_artefact_says_where_it_goes():
    from personalize.ui.artefacts import where_it_goes

    assert "load_textual_inversion" in where_it_goes("learned_embeds.safetensors")
    assert "embeddings/" in where_it_goes("star-emb.pt") and "star-emb" in where_it_goes("star-emb.safetensors")
    assert "load_lora_weights" in where_it_goes("pytorch_lora_weights.safetensors")
    assert "<lora:sks.kohya:1>" in where_it_goes("sks.kohya.safetensors")
    assert where_it_goes("config.yaml") and where_it_goes("batex_basis.safetensors") and where_it_goes("anchor")


def test_basic_auth_guards_pages_and_the_websocket_and_uploads_are_size_limited():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from personalize.ui.guards import BasicAuth, UploadLimit, parse_auth

    async def socket(ws):
        await ws.accept()
        await ws.send_text("hello")
        await ws.close()

    inner = Starlette(routes=[Route("/", lambda r: PlainTextResponse("page"), methods=["GET", "POST"]), WebSocketRoute("/ws", socket)])
    app = UploadLimit(BasicAuth(inner, *parse_auth("ann:s3cret")), limit=100)
    client = TestClient(app)
    assert client.get("/").status_code == 401 and "Basic" in client.get("/").headers["www-authenticate"]
    assert client.get("/", auth=("ann", "wrong")).status_code == 401
    with pytest.raises(WebSocketDisconnect):
        with client.websocket_connect("/ws"):
            pass
    page = client.get("/", auth=("ann", "s3cret"))
    assert page.text == "page" and "personalize_ui=" in page.headers["set-cookie"]
    with client.websocket_connect("/ws") as ws:  # the cookie the page set lets its websocket in
        assert ws.receive_text() == "hello"
    assert client.post("/", content=b"x" * 101, auth=("ann", "s3cret")).status_code == 413
    with pytest.raises(PersonalizeError, match="USER:PASSWORD"):
        parse_auth("no-colon")


def test_personalize_ui_refuses_a_bad_auth_before_serving(capsys):
    from personalize.cli import main

    assert main(["ui", "--auth", "nopassword", "--no-browser"]) == 2
    assert "USER:PASSWORD" in capsys.readouterr().err


def test_the_report_shows_settings_as_a_table_small_images_enlarged_and_each_samples_reading(tmp_path):
    from personalize.evaluate.report import write_report

    star = Image.open(Path(__file__).resolve().parent.parent / "examples" / "blue-striped-star" / "000.png").convert("RGB")
    files = write_report(tmp_path, [{"name": "ESR", "value": 0.5, "n": 2, "convention": "toy"}],
                         context={"protocol": "toy", "concepts": ["runs/star"], "images_per_prompt": {"a <c>": 2}},
                         samples={"a <c>": [star, star.resize((32, 32))]})
    page = files[2].read_text()
    assert "<pre>" not in page and "<th>images per prompt</th><td>a &lt;c&gt;: 2</td>" in page
    assert page.count("image-rendering:pixelated") == 2 and "width='128'" in page
    assert page.count("judge: ") == 2 and "star" in page.split("judge: ")[1]  # the toy judge's reading beside each


# -- the server's guards ----------------------------------------------------------------------------------------------


@pytest.fixture
def live_ui(tmp_path):
    """`personalize ui` in a child process on a free local port, as a user starts it; its port once it answers."""
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    log = open(tmp_path / "ui.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen([sys.executable, "-m", "personalize.cli", "ui", "--workspace", str(tmp_path / "ws"),
                               "--port", str(port), "--no-browser"], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "ui.log").read_text()
                time.sleep(0.2)
        yield port
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=20)
        log.close()


def _raw_request(port: int, lines: list[str]) -> str:
    """Send a raw HTTP/1.1 request (headers as a browser would send them) and return the status line."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return conn.recv(4096).decode("latin-1").split("\r\n")[0]


def _websocket_handshake(port: int, host: str, origin: str) -> str:
    return _raw_request(port, [
        "GET /_nicegui_ws/socket.io/?EIO=4&transport=websocket HTTP/1.1", f"Host: {host}", f"Origin: {origin}",
        "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13"])


def test_the_server_answers_only_its_own_host_names_and_pages(live_ui):
    """Issue 24.6: with no --auth, any web page the user visits could drive the UI — by DNS rebinding (a foreign
    Host header) or by opening its socket.io websocket from another origin."""
    port = live_ui
    own = f"127.0.0.1:{port}"
    assert " 200 " in _raw_request(port, ["GET / HTTP/1.1", f"Host: {own}", "Connection: close"])
    assert " 200 " in _raw_request(port, ["GET / HTTP/1.1", f"Host: localhost:{port}", "Connection: close"])
    assert " 421 " in _raw_request(port, ["GET / HTTP/1.1", f"Host: rebound.example:{port}", "Connection: close"])
    assert " 421 " in _raw_request(port, ["GET /_nicegui_ws/socket.io/?EIO=4&transport=polling HTTP/1.1",
                                          f"Host: rebound.example:{port}", "Connection: close"])
    assert " 403 " in _raw_request(port, ["POST /_nicegui_ws/socket.io/?EIO=4&transport=polling HTTP/1.1", f"Host: {own}",
                                          "Origin: https://evil.example", "Content-Length: 0", "Connection: close"])
    assert " 101 " in _websocket_handshake(port, own, f"http://{own}")  # the page's own websocket
    assert " 101 " not in _websocket_handshake(port, own, "https://evil.example")
    assert " 101 " not in _websocket_handshake(port, own, f"http://127.0.0.1:{port + 1}")  # another local port
    assert " 101 " not in _websocket_handshake(port, f"rebound.example:{port}", f"http://rebound.example:{port}")


def test_the_guard_allows_the_names_of_the_address_it_listens_on():
    from personalize.ui.guards import allowed_host_names

    assert {"localhost", "127.0.0.1", "::1"} <= allowed_host_names("127.0.0.1")
    assert "localhost" not in allowed_host_names("192.168.1.5") and "192.168.1.5" in allowed_host_names("192.168.1.5")
    assert "ui.lan" in allowed_host_names("0.0.0.0", ("ui.lan",))


def test_a_jobs_log_shows_a_progress_bar_once_as_a_terminal_does(tmp_path):
    """tqdm redraws its bar with carriage returns: the Jobs log shows its last state, not one line per redraw."""
    ws = Workspace(tmp_path)
    bar = "".join(f"\rtrain: {i}/300 loss={i / 1000:.3f}" for i in range(0, 301, 50))
    jobs = JobManager(ws, python=fake_python(tmp_path, f"printf 'loading\\n{bar}\\ndone\\n'"))
    job = jobs.submit("generate", ["generate"], "a")
    wait_until(jobs, lambda: job.state == "finished")
    assert jobs.log_tail(job).splitlines()[-3:] == ["loading", "train: 300/300 loss=0.300", "done"]
