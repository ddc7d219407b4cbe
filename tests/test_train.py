"""The trainer end to end through the CLI: learning, exact resume, refusals, config files, every tiny family."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import EXAMPLE_IMAGES
from personalize import cli
from personalize.backbone import load_backbone
from personalize.errors import PersonalizeError
from personalize.methods import Batch, Method
from personalize.methods import Batex, BatexConfig, TextualInversion, TextualInversionConfig


def run(args, expect=0):
    assert cli.main(["train", *map(str, args)]) == expect


def base_args(out, *extra):
    return ["--images", EXAMPLE_IMAGES, "--output", out, "--init-word", "cat", "--batch-size", 2,
            "--num-validation-images", 1, "--inference-steps", 2, *extra]


def embeds(out):
    return load_file(str(out / "learned_embeds.safetensors"))


@pytest.mark.parametrize("method", ["textual-inversion", "batex"])
def test_training_lowers_the_denoising_loss_on_held_fixed_noise(tmp_path, method):
    """Loss on a fixed set of (noise, timestep) draws, before and after training: it must go down."""
    out = tmp_path / method
    run(base_args(out, "--method", method, "--steps", 60, "--lr", "2e-2" if method == "batex" else "5e-3"))
    cfg = (BatexConfig if method == "batex" else TextualInversionConfig)(init_word="cat")

    def fixed_loss(vectors):
        from personalize.trainer import LatentCache
        from personalize.data import load_image_folder

        backbone = load_backbone("tiny")
        backbone.freeze()
        m = (Batex if method == "batex" else TextualInversion)(cfg, backbone)
        if vectors is not None:
            with torch.no_grad():
                if method == "batex":
                    m.sources[0].w.copy_(vectors)
                else:
                    m.sources[0].value.copy_(vectors)
        images = load_image_folder(EXAMPLE_IMAGES, 32)
        cache = LatentCache(backbone, torch.stack([i.pixels for i in images]), False, "cpu")
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            losses = [m.loss(Batch(*cache.sample(8, g)[:2], g), "main")[0].item() for _ in range(30)]
        return sum(losses) / len(losses)

    if method == "batex":
        learned = load_file(str(out / "batex_basis.safetensors"))["encoder_0.w"]
    else:
        learned = embeds(out)["<concept>"]
    before, after = fixed_loss(None), fixed_loss(learned)
    assert after < before * 0.997, (before, after)  # deterministic draws: a real decrease, not noise


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
    assert (out / "kitty.pt").is_file() and (out / "validation" / "step-000002.png").is_file()


@pytest.mark.parametrize("model", ["tiny-v", "tiny-xl"])
def test_batex_trains_on_v_prediction_and_sdxl(tmp_path, model):
    run(base_args(tmp_path, "--model", model, "--method", "batex", "--steps", 3, "--num-vectors", 2))
    files = embeds(tmp_path)
    if model == "tiny-xl":
        assert sorted(files) == ["clip_g", "clip_l"] and files["clip_l"].shape == (2, 32)
        assert (tmp_path / "concept.safetensors").is_file()
    else:
        assert files["<concept>"].shape == (2, 32)


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


def test_real_photos_train(tmp_path, dreambench):
    run(["--images", dreambench / "dog", "--output", tmp_path, "--init-word", "dog", "--steps", 2,
         "--method", "batex", "--batch-size", 4, "--num-validation-images", 1, "--inference-steps", 2])
    assert embeds(tmp_path)["<concept>"].shape == (1, 32)


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
    from personalize.trainer import sdxl_time_ids

    Image.new("RGB", (90, 30), "red").save(tmp_path / "wide.png")
    Image.new("RGB", (40, 40), "blue").save(tmp_path / "square.png")
    images = load_image_folder(tmp_path, 32)
    ids = sdxl_time_ids(images, 32, flip=True)
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
    import numpy as np

    from personalize.generate import generate_images, install_concept

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
    assert (out / "concept.kohya.safetensors").is_file()

    def draw(*files):
        backbone = load_backbone("tiny")
        loaded = [install_concept(backbone, f) for f in files]
        image = generate_images(backbone, ["a photo of <concept>"], [0], steps=2)[0]
        return loaded, torch.tensor(np.asarray(image), dtype=torch.float)

    loaded, both = draw(out)
    assert "LoRA" in loaded[0] and "<concept>" in loaded[0]
    _, vectors_only = draw(out / "learned_embeds.safetensors")
    assert (both - vectors_only).abs().max() > 0  # the LoRA changes what the folder draws
    _, kohya = draw(out / "learned_embeds.safetensors", out / "concept.kohya.safetensors")
    assert (kohya - both).abs().max() <= 1  # the kohya file is the same LoRA


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
