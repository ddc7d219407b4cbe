"""The trainer end to end through the CLI: learning, exact resume, refusals, config files, every tiny family."""

import errno
import io
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import EXAMPLE_IMAGES
from personalize import cli
from personalize.backbone import load_backbone
from personalize.errors import PersonalizeError
from personalize.export import run_name
from personalize.methods import Batch, Method
from personalize.methods import Batex, BatexConfig, TextualInversion, TextualInversionConfig
from personalize.checkpoints import checkpoint_dirs


def run(args, expect=0):
    assert cli.main(["train", *map(str, args)]) == expect


def base_args(out, *extra):
    return ["--images", EXAMPLE_IMAGES, "--output", out, "--init-word", "cat", "--batch-size", 2,
            "--num-validation-images", 1, "--inference-steps", 2, *extra]


def embeds(out):
    return load_file(str(out / "learned_embeds.safetensors"))


def held_out_loss(method: str, learned: list[torch.Tensor] | None, model: str = "tiny", images=EXAMPLE_IMAGES,
                  init_word: str = "cat", **config) -> float:
    """The denoising loss on a fixed set of (noise, timestep) draws over `images`, with `learned` (per text encoder:
    BaTex's w, TI's vectors) in place of the initialisation; None = the initialisation."""
    from personalize.data import load_image_folder
    from personalize.latents import LatentCache

    backbone = load_backbone(model)
    backbone.freeze()
    cfg = (BatexConfig if method == "batex" else TextualInversionConfig)(init_word=init_word, **config)
    loaded = load_image_folder(images, backbone.default_resolution)
    m = (Batex if method == "batex" else TextualInversion)(cfg, backbone, captions=[i.caption for i in loaded])  # as train() does
    if learned is not None:
        with torch.no_grad():
            first = m.sources[0]  # the concept's source per text encoder (sources: [encoder] or [concept][encoder])
            for source, value in zip(first if isinstance(first, torch.nn.ModuleList) else m.sources, learned, strict=True):
                (source.w if method == "batex" else source.value).copy_(value)
    cache = LatentCache(backbone, torch.stack([i.pixels for i in loaded]), False, "cpu")
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        losses = [m.loss(Batch(*cache.sample(8, g)[:2], g), "main")[0].item() for _ in range(30)]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("method", ["textual-inversion", "batex"])
def test_training_lowers_the_denoising_loss_on_held_fixed_noise(tmp_path, method):
    """Loss on a fixed set of (noise, timestep) draws, before and after training: it must go down."""
    out = tmp_path / method
    run(base_args(out, "--method", method, "--steps", 60, "--lr", "2e-2" if method == "batex" else "5e-3"))
    if method == "batex":
        learned = load_file(str(out / "batex_basis.safetensors"))["encoder_0.w"]
    else:
        learned = embeds(out)["<concept>"]
    before, after = held_out_loss(method, None), held_out_loss(method, [learned])
    assert after < before * 0.997, (before, after)  # deterministic draws: a real decrease, not noise


@pytest.mark.parametrize("method, extra, mirrors", [
    ("textual-inversion", ["--init-word", "cat"], True),  # as the paper's code and diffusers' TI example
    ("textual-inversion", ["--init-word", "cat", "--no-flip"], False),
    ("dreambooth-lora", ["--class-word", "cat"], False),  # as diffusers' and kohya's DreamBooth scripts
    ("dis2booth", ["--class-word", "cat"], False),
    ("dreambooth-lora", ["--class-word", "cat", "--flip"], True),
])
def test_mirrors_are_the_methods_default_unless_asked_and_config_records_what_ran(tmp_path, monkeypatch, method, extra, mirrors):
    import personalize.trainer as trainer

    caches = []

    def recording_cache(*args, **kwargs):
        caches.append(original(*args, **kwargs))
        return caches[-1]

    original = trainer.LatentCache
    monkeypatch.setattr(trainer, "LatentCache", recording_cache)
    out = tmp_path / "run"
    run(["--method", method, "--images", EXAMPLE_IMAGES, "--output", out, "--steps", 1, "--batch-size", 2,
         "--num-validation-images", 0, *extra])
    cache = caches[0]
    assert sum(len(s.mean) for s in cache.shards) == cache.num_images * (2 if mirrors else 1)
    assert yaml.safe_load((out / "config.yaml").read_text())["flip"] is mirrors


@pytest.mark.parametrize("flip", [False, True])
def test_a_distinct_batch_holds_each_image_once_until_all_were_drawn_and_mirrors_each_half_the_time(flip):
    """--batch-draw distinct: a batch of 4 from 5 images never repeats one (the independent draw does, often);
    a batch of 7 holds all 5 once before any twice; with mirrors each row is the mirror about half the time."""
    from personalize.latents import LatentCache

    pixels = [torch.full((3, 32, 32), float(i) / 5) for i in range(5)]
    backbone = load_backbone("tiny")
    distinct, independent = (LatentCache(backbone, pixels, flip, "cpu", distinct=d) for d in (True, False))
    g = torch.Generator().manual_seed(0)
    batches = [distinct.sample(4, g)[1] for _ in range(200)]
    assert all(len(set(b.tolist())) == 4 for b in batches)
    assert sum(len(set(independent.sample(4, g)[1].tolist())) < 4 for _ in range(200)) > 100  # 1 - 5·4·3·2/5⁴ = 0.81
    for _ in range(50):
        counts = torch.bincount(distinct.sample(7, g)[1], minlength=5)
        assert counts.min() == 1 and counts.max() == 2
    mirrored = []
    for _ in range(200):
        distinct.sample(4, g)
        mirrored.append(distinct.last_flipped.float())
    assert torch.cat(mirrored).mean().item() == (pytest.approx(0.5, abs=0.05) if flip else 0)


def test_a_latent_drawn_once_is_one_posterior_sample_per_row_and_the_same_every_batch():
    """--latent-draw once (kohya's cached latents): each cached row is one sample of its posterior, drawn from the
    seed (the same again from the same seed, another from another), and every batch returns exactly it."""
    from personalize.latents import LatentCache

    pixels = [torch.rand((3, 32, 32), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    backbone = load_backbone("tiny")
    fresh, once, again, other = (LatentCache(backbone, pixels, True, "cpu", draw_once=s) for s in (None, 0, 0, 1))
    shard = fresh.shards[0]
    assert (shard.std > 0).all() and (once.shards[0].std == 0).all()
    assert torch.equal(once.shards[0].mean, again.shards[0].mean)
    assert not torch.allclose(once.shards[0].mean, other.shards[0].mean)
    drawn = once.shards[0].mean - shard.mean  # std·ε: a real draw, of the posterior's own scale
    assert 0.5 < (drawn / shard.std).std().item() < 1.5
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        z, images, _ = once.sample(4, g)
        rows = images + len(pixels) * once.last_flipped.long()  # mirrors are cached after the images
        assert torch.equal(z, once.shards[0].mean[rows])
        assert not torch.equal(fresh.sample(4, g)[0], fresh.sample(4, torch.Generator().manual_seed(9))[0])


def test_latent_draw_is_recorded_and_changes_what_trains(tmp_path):
    args = ["--method", "textual-inversion", "--steps", 2, "--batch-size", 2]
    run(base_args(tmp_path / "once", *args, "--latent-draw", "once"))
    run(base_args(tmp_path / "every", *args))
    assert yaml.safe_load((tmp_path / "once" / "config.yaml").read_text())["latent_draw"] == "once"
    assert not torch.allclose(embeds(tmp_path / "once")["<concept>"], embeds(tmp_path / "every")["<concept>"])


def test_a_distinct_run_records_its_draw_and_resumes_exactly(tmp_path, monkeypatch):
    """The draw is part of what ran (config.yaml) and needs no state beyond the generator: a run killed after a
    checkpoint and resumed ends bit for bit where an uninterrupted one does; and the draw changes what trains."""
    args = ["--method", "textual-inversion", "--steps", 4, "--checkpointing-steps", 2, "--batch-size", 3]
    run(base_args(tmp_path / "straight", *args, "--batch-draw", "distinct"))
    run_killed_at_loss_call(monkeypatch, TextualInversion, 3, base_args(tmp_path / "resumed", *args, "--batch-draw", "distinct"))
    run(base_args(tmp_path / "resumed", *args, "--batch-draw", "distinct", "--resume", "latest"))
    assert yaml.safe_load((tmp_path / "straight" / "config.yaml").read_text())["batch_draw"] == "distinct"
    straight = embeds(tmp_path / "straight")["<concept>"]
    assert torch.equal(straight, embeds(tmp_path / "resumed")["<concept>"])
    run(base_args(tmp_path / "independent", *args))
    assert not torch.allclose(straight, embeds(tmp_path / "independent")["<concept>"])


def run_killed_at_loss_call(monkeypatch, method_cls, call: int, args) -> None:
    """Run `args` and kill it (KeyboardInterrupt, exit 130) during the `call`-th loss computation."""
    calls = {"n": 0}
    original = method_cls.loss

    def dying_loss(self, batch, group):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return original(self, batch, group)

    monkeypatch.setattr(method_cls, "loss", dying_loss)
    run(args, expect=130)
    monkeypatch.setattr(method_cls, "loss", original)


def test_killed_run_resumes_bit_identical(tmp_path, monkeypatch):
    args = ["--method", "batex", "--steps", 6, "--checkpointing-steps", 2, "--seed", 7]
    run(base_args(tmp_path / "straight", *args))
    run_killed_at_loss_call(monkeypatch, Batex, 5, base_args(tmp_path / "resumed", *args))  # after the step-4 checkpoint
    assert (tmp_path / "resumed" / "checkpoints" / "step-000004").is_dir()
    run(base_args(tmp_path / "resumed", *args, "--resume", "latest"))
    a, b = embeds(tmp_path / "straight"), embeds(tmp_path / "resumed")
    assert torch.equal(a["<concept>"], b["<concept>"])
    cat = load_backbone("tiny").text_encoders[0].get_input_embeddings().weight[2368]
    assert not torch.allclose(a["<concept>"][0], cat)  # and it did train


def test_finished_output_is_refused_unless_overwrite(tmp_path, capsys):
    run(base_args(tmp_path, "--steps", 1))
    run(base_args(tmp_path, "--steps", 1), expect=2)
    assert "already holds a finished run" in capsys.readouterr().err
    run(base_args(tmp_path, "--steps", 1, "--overwrite"))
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "finished"


def test_config_file_drives_a_run_and_flags_win(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"method": "batex", "steps": 1, "basis-size": 10, "init_word": "dog", "seed": 3}))
    out = tmp_path / "out"
    run(["--config", config, *base_args(out, "--steps", 2)])  # --init-word cat on the command line wins
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert (resolved["method"], resolved["steps"], resolved["basis_size"], resolved["init_word"], resolved["seed"]) == (
        "batex", 2, 10, "cat", 3)
    assert load_file(str(out / "batex_basis.safetensors"))["encoder_0.w"].shape == (1, 10)


def test_config_file_with_unknown_option_is_refused(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('steps = 1\nlearning_rat = 0.1\n')
    run(["--config", config, *base_args(tmp_path / "o")], expect=2)
    assert "learning_rat" in capsys.readouterr().err


def test_diffusers_spellings_are_accepted(tmp_path):
    out = tmp_path / "o"
    run(["--pretrained_model_name_or_path", "tiny", "--instance_data_dir", EXAMPLE_IMAGES, "--output_dir", out,
         "--max_train_steps", 2, "--placeholder_token", "<kitty>", "--initializer_token", "cat",
         "--train_batch_size", 3, "--learning_rate", "1e-3", "--checkpointing_steps", 1, "--num-validation-images", 1,
         "--inference-steps", 2])
    assert list(embeds(out)) == ["<kitty>"]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert (resolved["batch_size"], resolved["lr"], resolved["checkpointing_steps"]) == (3, 1e-3, 1)
    assert (out / "o-emb.pt").is_file() and (out / "validation" / "step-000002.png").is_file()  # named after the run


def plain_diffusers_draw(model: str, embedding, prompt: str = "a photo of <concept>"):
    """A fresh `build_tiny_pipeline(model)` (plain diffusers, no personalize code) with an embedding loaded the
    README's way — `embedding` is a run folder, or one [n, d] tensor per text encoder — and the image it draws for
    `prompt` in float (before 8-bit rounding), with the vectors the pipeline ended up holding for the token."""
    from personalize.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(model)
    if isinstance(embedding, list):
        vectors = embedding
    elif model == "tiny-xl":  # one load per text encoder (README, "Using the files elsewhere")
        state = load_file(str(embedding / "learned_embeds.safetensors"))
        vectors = [state["clip_l"], state["clip_g"]]
    else:
        pipe.load_textual_inversion(str(embedding))
        vectors = None
    if vectors is not None:
        pipes = [(pipe.text_encoder, pipe.tokenizer), (getattr(pipe, "text_encoder_2", None), getattr(pipe, "tokenizer_2", None))]
        for (encoder, tokenizer), v in zip(pipes, vectors, strict=False):
            pipe.load_textual_inversion(v, token="<concept>", text_encoder=encoder, tokenizer=tokenizer)
    held = []
    for encoder, tokenizer in [(pipe.text_encoder, pipe.tokenizer), (getattr(pipe, "text_encoder_2", None), getattr(pipe, "tokenizer_2", None))]:
        if encoder is not None:
            ids = tokenizer.convert_tokens_to_ids(["<concept>"] + [t for t in tokenizer.get_vocab() if t.startswith("<concept>_")])
            held.append(encoder.get_input_embeddings().weight[sorted(ids)].detach().clone())
    with torch.no_grad():
        image = pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    return torch.tensor(image), held


@pytest.mark.parametrize("model", ["tiny-v", "tiny-xl"])
def test_batex_trains_on_v_prediction_and_sdxl(tmp_path, model):
    """BaTex on a v-prediction model and on SDXL's two encoders: each encoder's vectors move inside its own basis
    (the file is V_M·w of the sidecar), the loss goes down, and the file changes what plain diffusers draws."""
    run(base_args(tmp_path, "--model", model, "--method", "batex", "--steps", 30, "--num-vectors", 2, "--lr", "2e-2"))
    files = embeds(tmp_path)
    sidecar = load_file(str(tmp_path / "batex_basis.safetensors"))
    backbone = load_backbone(model)
    encoders = backbone.text_encoders
    keys = ["clip_l", "clip_g"] if model == "tiny-xl" else ["<concept>"]
    assert sorted(files) == sorted(keys) and len(encoders) == len(keys)
    if model == "tiny-xl":
        assert (tmp_path / f"{run_name(tmp_path)}-emb.safetensors").is_file()
    cat = backbone.tokenizers[0]("cat", add_special_tokens=False).input_ids[0]
    init = []
    for i, (key, encoder) in enumerate(zip(keys, encoders)):
        table = encoder.get_input_embeddings().weight.detach()
        ids, w = sidecar[f"encoder_{i}.basis_ids"], sidecar[f"encoder_{i}.w"]
        assert ids.shape == w.shape and ids.shape[0] == 2 and (ids[:, 0] == cat).all()
        # eq. 7 from the vocabulary: each saved vector is Σ_m w_m · table[id_m] of its own encoder's table
        expected = torch.stack([w[n][ids[n] >= 0] @ table[ids[n][ids[n] >= 0]] for n in range(2)])
        torch.testing.assert_close(files[key], expected, rtol=1e-5, atol=1e-6)
        assert w[:, 1:].abs().max() > 1e-2  # w left its one-hot start (eq. 3; weight decay alone only shrinks w[:, 0]) ...
        init.append(table[[cat, cat]])
        assert (files[key] - init[-1]).abs().max() > 1e-3  # ... and so did the vectors
    before = held_out_loss("batex", None, model, num_vectors=2)
    after = held_out_loss("batex", [sidecar[f"encoder_{i}.w"] for i in range(len(keys))], model, num_vectors=2)
    assert after < before * 0.997, (before, after)

    trained, held = plain_diffusers_draw(model, tmp_path)
    for key, row in zip(keys, held, strict=True):
        torch.testing.assert_close(row, files[key])  # diffusers holds exactly the file's vectors
    untrained, _ = plain_diffusers_draw(model, init)  # the same prompt with the vectors the run started from
    assert (trained - untrained).abs().max().item() > 1e-3  # the learned vectors change what is drawn


def test_vocabulary_never_changes(tmp_path, monkeypatch):
    import personalize.trainer as trainer

    used = []
    monkeypatch.setattr(trainer, "load_backbone", lambda *a, **k: used.append(load_backbone(*a, **k)) or used[-1])
    run(base_args(tmp_path, "--steps", 5, "--lr", "1e-2"))
    fresh = load_backbone("tiny").text_encoders[0].get_input_embeddings().weight
    assert torch.equal(used[0].text_encoders[0].get_input_embeddings().weight, fresh)
    assert not torch.allclose(embeds(tmp_path)["<concept>"], fresh[2368][None])  # while the concept moved


def test_nan_loss_stops_with_advice(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(TextualInversion, "loss", lambda self, b, g: (torch.tensor(float("nan"), requires_grad=True), {}))
    run(base_args(tmp_path, "--steps", 3), expect=2)
    assert "lower --lr" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--init-word", "zzqxj"], "split by the tokenizer"),
        (["--init-word", " "], "not a word"),
        (["--token", "cat"], "already a word"),
        (["--method", "nope"], "unknown --method"),
    ],
)
def test_bad_words_get_clear_errors(tmp_path, capsys, extra, message):
    run(base_args(tmp_path / "o", "--steps", 1, *extra), expect=2)
    assert message in capsys.readouterr().err


def test_multi_token_init_word_with_matching_vectors_starts_each_from_its_piece(tmp_path):
    backbone = load_backbone("tiny")
    pieces = backbone.tokenizers[0]("zzqxj", add_special_tokens=False).input_ids
    m = TextualInversion(TextualInversionConfig(init_word="zzqxj", num_vectors=len(pieces)), backbone)
    table = backbone.text_encoders[0].get_input_embeddings().weight
    assert torch.equal(m.vectors()[0], table[pieces])


def test_real_photos_train(tmp_path):
    """Real photos (large, non-square JPEGs: the repository's DreamBench photos enlarged to 640×480): BaTex learns
    from them (their held-out loss goes down), the vector stays V_M·w of the sidecar, and plain diffusers draws
    something else with it than with the init word."""
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for src in sorted(EXAMPLE_IMAGES.glob("*.jpg")):
        Image.open(src).resize((640, 480), Image.Resampling.BICUBIC).save(photos / src.name, quality=90)
    dog = "cat"  # the photos' class (the names below are the original test's)
    tmp_path = tmp_path / "run"
    run(["--images", photos, "--output", tmp_path, "--init-word", dog, "--steps", 30, "--lr", "2e-2",
         "--method", "batex", "--batch-size", 4, "--num-validation-images", 1, "--inference-steps", 2])
    vector = embeds(tmp_path)["<concept>"]
    sidecar = load_file(str(tmp_path / "batex_basis.safetensors"))
    ids, w = sidecar["encoder_0.basis_ids"][0], sidecar["encoder_0.w"]
    backbone = load_backbone("tiny")
    table = backbone.text_encoders[0].get_input_embeddings().weight.detach()
    dog = backbone.tokenizers[0](dog, add_special_tokens=False).input_ids[0]
    assert ids[0].item() == dog and w[0, 1:].abs().max() > 1e-2  # w left its one-hot start on "dog"
    torch.testing.assert_close(vector, w @ table[ids], rtol=1e-5, atol=1e-6)
    before = held_out_loss("batex", None, images=photos, init_word="cat")
    after = held_out_loss("batex", [w], images=photos, init_word="cat")
    assert after < before * 0.997, (before, after)
    trained, (held,) = plain_diffusers_draw("tiny", tmp_path)
    torch.testing.assert_close(held, vector)
    untrained, _ = plain_diffusers_draw("tiny", [table[[dog]]])
    assert (trained - untrained).abs().max().item() > 1e-3


def test_missing_tracker_package_is_named_before_any_work(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    run(base_args(tmp_path / "o", "--steps", 1, "--report-to", "tensorboard"), expect=2)
    assert "pip install tensorboard" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_validation_at_intervals_and_resume_of_a_finished_run_to_more_steps(tmp_path):
    run(base_args(tmp_path, "--steps", 4, "--validation-steps", 2, "--checkpointing-steps", 2,
                  "--validation-prompts", "a <concept>", "a <concept> in snow", "--num-validation-images", 2))
    grids = sorted(p.name for p in (tmp_path / "validation").iterdir())
    assert grids == ["step-000002.png", "step-000004.png"]
    from PIL import Image

    assert Image.open(tmp_path / "validation" / "step-000004.png").size == (2 * 32, 2 * 32)  # 2 seeds × 2 prompts
    run(base_args(tmp_path, "--steps", 6, "--validation-steps", 2, "--checkpointing-steps", 2, "--resume", "latest"))
    assert json.loads((tmp_path / "run.json").read_text())["step"] == 6
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000004", "step-000006"]  # limit 2


def test_sdxl_gets_each_images_size_and_crop_conditioning(tmp_path, monkeypatch):
    from PIL import Image

    from personalize.backbone import Backbone
    from personalize.data import load_image_folder
    from personalize.backbone import sdxl_time_ids

    Image.new("RGB", (90, 30), "red").save(tmp_path / "wide.png")
    Image.new("RGB", (40, 40), "blue").save(tmp_path / "square.png")
    images = load_image_folder(tmp_path, 32)
    ids = sdxl_time_ids(images, flip=True)
    assert ids.tolist() == [[40, 40, 0, 0, 32, 32], [30, 90, 0, 32, 32, 32],  # square.png, wide.png (96 px wide)
                            [40, 40, 0, 0, 32, 32], [30, 90, 0, 32, 32, 32]]  # mirrors: 96 − 32 − 32 = 32
    seen = []
    original = Backbone.unet_forward
    monkeypatch.setattr(Backbone, "unet_forward", lambda self, *a, **k: seen.append(a[4] if len(a) > 4 else k.get("time_ids")) or original(self, *a, **k))
    run(["--model", "tiny-xl", "--images", tmp_path, "--output", tmp_path / "o", "--init-word", "cat", "--steps", 1,
         "--batch-size", 4, "--num-validation-images", 0])
    assert {tuple(r) for r in seen[0].tolist()} <= {tuple(r) for r in ids.tolist()} and seen[0][:, 0].max() in (30, 40)


def test_ti_with_lora_steps_vectors_and_unet_lora_together_at_their_own_rates(tmp_path, monkeypatch):
    """TI+LoRA: one loss, one optimiser step moves both parts; the LoRA's rate is its own; the folder draws with both."""
    from personalize.generate import install_concept

    m = TextualInversion(TextualInversionConfig(init_word="cat", lora_rank=2), load_backbone("tiny"))
    (vectors, lora), = [m.optimizer_groups("main", 1e-2)]
    assert vectors["lr"] == 1e-2 and lora["lr"] == pytest.approx(2e-3) and len(lora["params"]) > 0
    m2 = TextualInversion(TextualInversionConfig(init_word="cat", lora_rank=2, lora_lr=3e-4), load_backbone("tiny"))
    assert m2.optimizer_groups("main", 1e-2)[1]["lr"] == 3e-4
    assert len(TextualInversion(TextualInversionConfig(init_word="cat"), load_backbone("tiny")).optimizer_groups("main", 1)) == 1

    calls = []
    original = TextualInversion.loss
    monkeypatch.setattr(TextualInversion, "loss", lambda self, b, g: calls.append(g) or original(self, b, g))
    out = tmp_path / "ti-lora"
    run(base_args(out, "--steps", 3, "--lr", "5e-3", "--lora-rank", 2, "--lora-lr", "1e-3"))
    assert calls == ["main"] * 3  # one forward/backward per step for both parts
    lora_file = load_file(str(out / "pytorch_lora_weights.safetensors"))
    ups = [v for k, v in lora_file.items() if "lora_B" in k]
    assert ups and all(k.startswith("unet.") for k in lora_file) and any(v.abs().max() > 0 for v in ups)  # B starts at 0
    cat = load_backbone("tiny").text_encoders[0].get_input_embeddings().weight[2368]
    assert not torch.allclose(embeds(out)["<concept>"][0], cat)
    assert (out / "ti-lora.kohya.safetensors").is_file()

    def draw(*files):  # in float, before 8-bit rounding: the 3-step LoRA moves pixels by a few grey levels only
        backbone = load_backbone("tiny")
        loaded = [install_concept(backbone, f) for f in files]
        image = backbone.pipe("a photo of <concept>", num_inference_steps=2, guidance_scale=7.5, height=32, width=32,
                              generator=torch.Generator().manual_seed(0), output_type="np").images[0]
        return loaded, torch.tensor(image)

    loaded, both = draw(out)
    assert "LoRA" in loaded[0] and "<concept>" in loaded[0]
    _, vectors_only = draw(out / "learned_embeds.safetensors")
    effect = (both - vectors_only).abs().max().item()
    assert effect > 1e-3  # the LoRA changes what the folder draws
    _, kohya = draw(out / "learned_embeds.safetensors", out / "ti-lora.kohya.safetensors")
    assert (kohya - both).abs().max().item() < effect / 100  # the kohya file is the same LoRA, not a similar one


def test_negative_lora_rank_is_refused(tmp_path, capsys):
    run(base_args(tmp_path / "o", "--steps", 1, "--lora-rank", -1), expect=2)
    assert "--lora-rank" in capsys.readouterr().err


def test_ti_with_lora_resumes_bit_identical(tmp_path, monkeypatch):
    args = ["--steps", 4, "--checkpointing-steps", 2, "--seed", 3, "--lora-rank", 2, "--lora-lr", "1e-3"]
    run(base_args(tmp_path / "straight", *args))
    run_killed_at_loss_call(monkeypatch, TextualInversion, 3, base_args(tmp_path / "resumed", *args))  # after step 2's checkpoint
    run(base_args(tmp_path / "resumed", *args, "--resume", "latest"))
    for name in ("learned_embeds.safetensors", "pytorch_lora_weights.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "resumed" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def record_learning_rates(monkeypatch, method_cls) -> list[float]:
    """The first parameter group's learning rate at each call of `method_cls.loss` (the rate its step will use)."""
    optimizers, rates = [], []
    original_adamw, original_loss = torch.optim.AdamW, method_cls.loss

    def adamw(*args, **kwargs):
        optimizers.append(original_adamw(*args, **kwargs))
        return optimizers[-1]

    def loss(self, batch, group):
        rates.append(optimizers[-1].param_groups[0]["lr"])
        return original_loss(self, batch, group)

    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    monkeypatch.setattr(method_cls, "loss", loss)
    return rates


def test_killed_run_with_warmup_and_cosine_decay_resumes_bit_identical_at_every_steps_rate(tmp_path, monkeypatch):
    """With the default constant rate a scheduler that restarts on resume is invisible; with a warm-up and a cosine
    decay the resumed run must still be the uninterrupted one bit for bit, and each step must use its rate."""
    steps, warmup, lr, batch = 8, 3, 5e-3, 2
    args = ["--steps", steps, "--checkpointing-steps", 2, "--seed", 5, "--lr", lr, "--lr-warmup-steps", warmup,
            "--lr-scheduler", "cosine"]
    base = lr * batch  # TI scales the rate by the batch size

    def expected(s):  # linear warm-up to the full rate over `warmup` steps, then a cosine to 0 at `steps`
        if s < warmup:
            return base * (s + 1) / warmup
        return base * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))

    rates = record_learning_rates(monkeypatch, TextualInversion)
    run(base_args(tmp_path / "straight", *args))
    assert rates == pytest.approx([expected(s) for s in range(steps)], rel=1e-12, abs=0)
    assert rates[0] < rates[1] < rates[2] == pytest.approx(base) and rates[3] > rates[4] > rates[5] > rates[6] > rates[7] > 0

    rates.clear()
    run_killed_at_loss_call(monkeypatch, TextualInversion, 6, base_args(tmp_path / "resumed", *args))  # in step 6
    assert len(rates) == 5 and [p.name for p in checkpoint_dirs(tmp_path / "resumed")] == ["step-000002", "step-000004"]
    rates.clear()
    run(base_args(tmp_path / "resumed", *args, "--resume", "latest"))
    assert rates == pytest.approx([expected(s) for s in range(4, steps)], rel=1e-12, abs=0)  # steps 5-8 of 8
    a, b = embeds(tmp_path / "straight")["<concept>"], embeds(tmp_path / "resumed")["<concept>"]
    assert torch.equal(a, b)
    cat = load_backbone("tiny").text_encoders[0].get_input_embeddings().weight[2368]
    assert not torch.allclose(a[0], cat)


def test_checkpoint_failing_midway_keeps_the_previous_one_and_leaves_no_partial_folder(tmp_path, monkeypatch, capsys):
    """The disk fills while step 4's checkpoint is half written: the error names the folder, step 2's checkpoint
    (the only one kept, --checkpoints-total-limit 1) survives whole, nothing else is left in checkpoints/, and
    resuming from it finishes exactly as the uninterrupted run did."""
    args = ["--steps", 4, "--checkpointing-steps", 2, "--checkpoints-total-limit", 1, "--seed", 4, "--lr", "5e-3"]
    run(base_args(tmp_path / "straight", *args))

    real_save, calls = torch.save, []

    def half_then_disk_full(obj, f, *a, **k):
        if Path(f).name == "state.pt":
            calls.append(f)
            if len(calls) == 2:  # step 4's checkpoint: write half of it, then fail as a full disk does
                buffer = io.BytesIO()
                real_save(obj, buffer, *a, **k)
                Path(f).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", half_then_disk_full)
    out = tmp_path / "failed"
    run(base_args(out, *args), expect=2)
    monkeypatch.setattr(torch, "save", real_save)
    err = capsys.readouterr().err
    assert len(calls) == 2 and str(out / "checkpoints" / "step-000004") in err and "No space left on device" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]  # no step-000004, no temp folder
    assert sorted(p.name for p in (out / "checkpoints" / "step-000002").iterdir()) == [
        "state.pt", "step.json", "trainable.safetensors"]
    status = json.loads((out / "run.json").read_text())
    assert (status["status"], status["step"]) == ("running", 2)

    run(base_args(out, *args, "--resume", "latest"))
    assert torch.equal(embeds(out)["<concept>"], embeds(tmp_path / "straight")["<concept>"])


def _one_ulp_up(t: torch.Tensor) -> torch.Tensor:
    changed = t.clone()
    changed.view(-1)[0] = torch.nextafter(changed.view(-1)[0], torch.tensor(float("inf"), dtype=t.dtype))
    return changed


@pytest.mark.parametrize("artefact", ["learned_embeds.safetensors", "run-emb.pt"])
def test_an_artefact_that_reads_back_different_fails_the_run(tmp_path, monkeypatch, capsys, artefact):
    """The "read back before success" check: a file that reads back one ULP off (a failing disk) fails the run
    with the disk message naming the file, and run.json never says finished."""
    import personalize.export as export

    if artefact.endswith(".safetensors"):
        real_load = export.load_file
        monkeypatch.setattr(export, "load_file", lambda path, *a, **k: {
            key: _one_ulp_up(v) if Path(path).name == artefact else v for key, v in real_load(path, *a, **k).items()})
    else:
        real_torch_load = torch.load

        def altered_torch_load(f, *a, **k):
            data = real_torch_load(f, *a, **k)
            if Path(f).name == artefact:
                data["string_to_param"]["*"] = _one_ulp_up(data["string_to_param"]["*"])
            return data

        monkeypatch.setattr(torch, "load", altered_torch_load)
    run(base_args(tmp_path / "run", "--steps", 2, "--lr", "5e-3"), expect=2)
    err = capsys.readouterr().err
    assert str(tmp_path / "run" / artefact) in err and "did not read back identical" in err and "disk" in err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] != "finished"


@pytest.mark.parametrize("verb", [["train", "--method", m] for m in ("textual-inversion", "batex", "dreambooth-lora", "dis2booth", "singleinsert")]
                         + [["generate"], ["evaluate"], ["bench"], ["toyworld", "train-base"], ["plot"], ["presets"]])
def test_every_help_page_prints(verb, capsys):
    """argparse formats help with %: a '30 %' in an option's help once crashed `train --help`."""
    with pytest.raises(SystemExit) as exit_:
        cli.main([*verb, "--help"])
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out
