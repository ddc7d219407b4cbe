"""DreamBooth-LoRA and Dis²Booth: files that load in diffusers and draw the same, sub-step isolation, the losses."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import EXAMPLE_IMAGES
from personalize import cli
from personalize.backbone import Backbone, load_backbone
from personalize.export import run_name
from personalize.methods import Batch, Dis2Booth, Dis2BoothConfig, DreamBoothLora, DreamBoothLoraConfig
from personalize.methods.dis2booth import contextual_loss, delta_loss, pool_positions
from personalize.tiny import build_tiny_pipeline


def draw(pipe, prompt="a photo of sks cat"):
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, guidance_scale=3.0, height=32, width=32, generator=g, output_type="np").images


def randomise(method, scale=0.2):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in method.lora_params.values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("model, text_encoder", [("tiny", False), ("tiny", True), ("tiny-xl", False), ("tiny-xl", True)])
def test_dreambooth_lora_files_load_in_diffusers_and_draw_the_same(tmp_path, model, text_encoder):
    backbone = load_backbone(model)
    backbone.freeze()
    method = DreamBoothLora(DreamBoothLoraConfig(class_word="cat", train_text_encoder=text_encoder), backbone)
    randomise(method)
    ours = draw(backbone.pipe)
    files = method.save(tmp_path, step=1)
    plain = draw(build_tiny_pipeline(model))
    assert abs(ours - plain).max() > 1e-3  # the LoRA changes the picture
    for f in files[:2]:  # diffusers file and kohya file, loaded as the README says (works offline on every stack)
        pipe = build_tiny_pipeline(model)
        pipe.load_lora_weights(str(f.parent), weight_name=f.name)
        assert abs(draw(pipe) - ours).max() < 1e-4, f.name
    meta = load_file(str(files[0]))
    assert any(k.startswith("unet.") and ".lora_A." in k for k in meta)
    assert any(k.startswith("text_encoder") for k in meta) == text_encoder


# LoraConfig's fields in peft 0.17.1, the oldest peft pyproject.toml declares: diffusers builds LoraConfig(**metadata),
# so one field more (peft 0.21's to_dict() has 9) and the file does not load there.
PEFT_0_17_LORA_FIELDS = {
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "corda_config", "eva_config", "exclude_modules",
    "fan_in_fan_out", "inference_mode", "init_lora_weights", "layer_replication", "layers_pattern", "layers_to_transform",
    "loftq_config", "lora_alpha", "lora_bias", "lora_dropout", "megatron_config", "megatron_core", "modules_to_save",
    "peft_type", "qalora_group_size", "r", "rank_pattern", "revision", "runtime_config", "target_modules",
    "target_parameters", "task_type", "trainable_token_indices", "use_dora", "use_qalora", "use_rslora"}


def file_metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("model", ["tiny", "tiny-xl"])
def test_diffusers_lora_file_is_what_the_oldest_declared_stack_reads(tmp_path, model):
    """Basic LoraConfig fields only, and text-encoder keys with the `text_model.` level transformers 4.x needs
    (this stack's 5.x CLIP has no such level: the draw test above shows diffusers loads the file here all the same)."""
    from peft import LoraConfig

    backbone = load_backbone(model)
    backbone.freeze()
    method = DreamBoothLora(DreamBoothLoraConfig(class_word="cat", rank=4, lora_alpha=2, train_text_encoder=True), backbone)
    path = method.save(tmp_path, step=1)[0]
    packed = json.loads(file_metadata(path)["lora_adapter_metadata"])
    configs = {}
    for key, value in packed.items():
        component, field = key.split(".", 1)
        configs.setdefault(component, {})[field] = value
    encoders = ["text_encoder", "text_encoder_2"][: len(backbone.text_encoders)]
    assert sorted(configs) == sorted(["unet", *encoders])
    for component, config in configs.items():
        assert set(config) <= PEFT_0_17_LORA_FIELDS, (component, set(config) - PEFT_0_17_LORA_FIELDS)
        assert (config["r"], config["lora_alpha"]) == (4, 2)
        assert LoraConfig(**config).target_modules == set(config["target_modules"])  # what diffusers builds
    keys = load_file(str(path))
    for encoder in encoders:
        assert f"{encoder}.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
        assert all(k.startswith(f"{encoder}.text_model.encoder.") for k in keys if k.startswith(f"{encoder}."))


def a1111_version(meta: dict) -> str:
    """A1111's rule (extensions-builtin/Lora/network.py, NetworkOnDisk.detect_version), restated."""
    if str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(meta.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if meta else "Unknown"


@pytest.mark.parametrize("model, version, base, v2, v_pred, te", [
    ("tiny", "SD1", "sd_v1", "False", "False", True),
    ("tiny-v", "SD2", "sd_v2_v", "True", "True", False),
    ("tiny-xl", "SDXL", "sdxl_base_v1-0", "False", "False", True),
])
def test_kohya_file_carries_kohyas_metadata_so_a1111_files_it_right(tmp_path, model, version, base, v2, v_pred, te):
    backbone = load_backbone(model)
    backbone.freeze()
    method = DreamBoothLora(DreamBoothLoraConfig(class_word="cat", rank=4, lora_alpha=2, train_text_encoder=te), backbone)
    meta = file_metadata(method.save(tmp_path, step=7)[1])
    assert a1111_version(meta) == version
    assert (meta["ss_base_model_version"], meta["ss_v2"], meta["ss_v_parameterization"]) == (base, v2, v_pred)
    assert meta["ss_resolution"] == "(32, 32)"  # no run config beside the files: the model's native size
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("networks.lora", "4", "2.0")
    assert meta["ss_network_train_unet_only"] == str(not te)
    args = json.loads(meta["ss_network_args"])
    assert args["unet_target_modules"] == "to_k,to_out.0,to_q,to_v"
    assert ("text_encoder_target_modules" in args) == te
    assert (meta["ss_steps"], meta["ss_sd_model_name"]) == ("7", model)


def test_lora_runs_with_the_default_token_name_their_kohya_files_after_the_run_and_say_what_to_type(tmp_path):
    """Issue 24, point 2: every DreamBooth-LoRA run with the default token used to write `sks.kohya.safetensors`, so
    two of them copied into A1111's models/Lora/ (or ComfyUI's models/loras/) overwrote each other. The file is named
    after the run's folder, and HOW-TO-USE.txt beside it says the <lora:...> tag and the words the LoRA was trained on."""
    backbone = load_backbone("tiny")
    backbone.freeze()
    method = DreamBoothLora(DreamBoothLoraConfig(class_word="dog"), backbone)
    kohya = {run: method.save(tmp_path / "runs" / run, step=1)[1] for run in ("rex", "Fido 2")}
    assert {run: f.name for run, f in kohya.items()} == {"rex": "rex.kohya.safetensors", "Fido 2": "Fido-2.kohya.safetensors"}
    for run, f in kohya.items():
        stem = f.name.removesuffix(".safetensors")
        assert file_metadata(f)["ss_output_name"] == stem.removesuffix(".kohya")  # as kohya's trainer records it
        howto = (f.parent / "HOW-TO-USE.txt").read_text()
        assert f"{f.name}\n  A1111 / Forge: copy into models/Lora/, then add <lora:{stem}:1> to the prompt and write sks dog" in howto
        assert "ComfyUI: copy into models/loras/, load it with a LoraLoader node, then write sks dog" in howto
        assert 'pipe.load_lora_weights("RUN_FOLDER", weight_name="pytorch_lora_weights.safetensors"), then write sks dog' in howto


def test_kohya_resolution_is_the_runs(tmp_path):
    assert cli.main(["train", "--method", "dreambooth-lora", "--images", str(EXAMPLE_IMAGES), "--class-word", "cat",
                     "--steps", "1", "--resolution", "16", "--num-validation-images", "0", "--output", str(tmp_path)]) == 0
    assert file_metadata(tmp_path / f"{run_name(tmp_path)}.kohya.safetensors")["ss_resolution"] == "(16, 16)"


@pytest.mark.parametrize("sdxl, width, prediction, expected", [
    (True, 768, "epsilon", "sdxl"), (False, 1024, "epsilon", "sd2"), (False, 1024, "v_prediction", "sd2"),
    (False, 768, "epsilon", "sd1"), (False, 768, "v_prediction", "sd1"),  # an SD 1.x v-prediction fine-tune
    (False, 32, "v_prediction", "sd2"), (False, 32, "epsilon", "sd1"),  # tiny-v, tiny
])
def test_sd_version_from_the_text_encoder_width_then_the_prediction(sdxl, width, prediction, expected):
    model = SimpleNamespace(is_sdxl=sdxl, embedding_dims=[width], prediction_type=prediction)
    assert Backbone.sd_version.fget(model) == expected


def test_dis2booth_fused_lora_equals_the_two_adapters(tmp_path):
    backbone = load_backbone("tiny")
    backbone.freeze()
    method = Dis2Booth(Dis2BoothConfig(class_word="cat", rank=4, anchor_weight=0.7, delta_weight=0.4), backbone)
    method._split()
    randomise(method)
    ours = draw(backbone.pipe)
    files = method.save(tmp_path, step=1)
    name = run_name(tmp_path)  # other tools see the run's name, the parts' files say which part they are
    assert [f.relative_to(tmp_path).as_posix() for f in files if f.name.endswith(".kohya.safetensors")] == [
        f"{name}.kohya.safetensors", f"anchor/{name}-anchor.kohya.safetensors", f"delta/{name}-delta.kohya.safetensors"]
    howto = (tmp_path / "HOW-TO-USE.txt").read_text()
    assert f"<lora:{name}.kohya:1>" in howto and "sks cat" in howto and "set_adapters(['anchor', 'delta'], [0.7, 0.4])" in howto
    fused = build_tiny_pipeline("tiny")
    fused.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    parts = build_tiny_pipeline("tiny")
    parts.load_lora_weights(str(tmp_path / "anchor"), weight_name="pytorch_lora_weights.safetensors", adapter_name="anchor")
    parts.load_lora_weights(str(tmp_path / "delta"), weight_name="pytorch_lora_weights.safetensors", adapter_name="delta")
    parts.set_adapters(["anchor", "delta"], adapter_weights=[0.7, 0.4])
    kohya = build_tiny_pipeline("tiny")
    kohya.load_lora_weights(str(tmp_path), weight_name=f"{name}.kohya.safetensors")
    assert abs(ours - draw(build_tiny_pipeline("tiny"))).max() > 1e-3
    for pipe in (fused, parts, kohya):
        assert abs(draw(pipe) - ours).max() < 1e-4
    assert load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))[
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"].shape[0] == 8  # rank 2r


def test_split_keeps_the_warm_up_model_exactly():
    backbone = load_backbone("tiny")
    backbone.freeze()
    method = Dis2Booth(Dis2BoothConfig(class_word="cat", rank=4, anchor_weight=0.3, delta_weight=0.5), backbone)
    randomise(method)
    with torch.no_grad():  # delta is zero before the split (B = 0 in peft's init)
        for k, p in method.lora_params.items():
            if k.startswith("delta__"):
                p.zero_()
    before = draw(backbone.pipe)
    method.begin_step(0)  # still warming up: nothing happens
    assert not method.split_done.item()
    method.begin_step(method.config.warmup_steps)
    assert method.split_done.item()
    torch.testing.assert_close(draw(backbone.pipe), before, atol=1e-5, rtol=0)


OWNERS = {"warmup": {"anchor"}, "contextual": {"anchor"}, "delta": {"delta"}, "ldm": {"anchor", "delta"},
          "anchor+ldm": {"anchor"}, "delta+ldm": {"delta"}, "both": {"anchor", "delta"}}


@pytest.mark.parametrize("schedule, expected", [
    ("algorithm1", ["warmup"] + ["contextual", "ldm", "delta", "ldm", "delta", "ldm"] * 2),
    ("folded", ["warmup"] + ["anchor+ldm", "delta+ldm", "delta+ldm"] * 2),
])
def test_each_sub_step_updates_only_its_own_adapters(tmp_path, monkeypatch, schedule, expected):
    """Through the real trainer: snapshot every LoRA weight before each sub-step; what changed must be exactly the
    adapters the sub-step names (a feature step against a still-empty queue changes nothing), and while a sub-step's
    loss runs only its own adapters may take gradients."""
    seen = []
    original, original_begin = Dis2Booth.loss, Dis2Booth.begin_step

    def check_last(self):
        if seen and seen[-1][1] is not None:  # what the previous sub-step's optimiser step changed
            last_group, last, learned = seen[-1]
            changed = {k.split("__")[0] for k, p in self.lora_params.items() if not torch.equal(p, last[k])}
            assert changed == (OWNERS[last_group] if learned else set()), (last_group, changed)
            seen[-1] = (last_group, None, learned)  # checked (the split may now copy the anchor into delta)

    def begin(self, step):
        check_last(self)
        original_begin(self, step)

    def spy(self, batch, group):
        check_last(self)
        trainable = {k.split("__")[0] for k, p in self.lora_params.items() if p.requires_grad}
        assert trainable == OWNERS[group], (group, trainable)  # also in the first sub-step after the split
        result = original(self, batch, group)
        seen.append((group, {k: p.detach().clone() for k, p in self.lora_params.items()}, result[0].requires_grad))
        return result

    monkeypatch.setattr(Dis2Booth, "loss", spy)
    monkeypatch.setattr(Dis2Booth, "begin_step", begin)
    assert cli.main(["train", "--method", "dis2booth", "--images", str(EXAMPLE_IMAGES), "--class-word", "cat",
                     "--output", str(tmp_path), "--steps", "3", "--warmup-steps", "1", "--delta-steps", "2",
                     "--rank", "4", "--lr", "1e-2", "--batch-size", "2", "--num-validation-images", "0",
                     "--schedule", schedule, "--contextual-loss-weight", "1", "--delta-loss-weight", "1"]) == 0
    assert [g for g, _, _ in seen] == expected
    assert Dis2Booth.updates_per_run(Dis2BoothConfig(class_word="cat", warmup_steps=1, delta_steps=2, schedule=schedule), 3) == len(expected)


def test_dis2booth_resumes_exactly_with_its_queues(tmp_path, monkeypatch):
    args = ["--method", "dis2booth", "--images", str(EXAMPLE_IMAGES), "--class-word", "cat", "--steps", "4",
            "--warmup-steps", "1", "--delta-steps", "1", "--rank", "4", "--lr", "1e-2", "--batch-size", "2",
            "--checkpointing-steps", "2", "--num-validation-images", "0", "--contextual-loss-weight", "10",
            "--delta-loss-weight", "10"]
    assert cli.main(["train", *args, "--output", str(tmp_path / "a")]) == 0
    calls = {"n": 0}
    original = Dis2Booth.loss

    def dying(self, batch, group):
        calls["n"] += 1
        if calls["n"] == 6:  # during step 4, after the step-2 checkpoint... and queues already filled
            raise KeyboardInterrupt
        return original(self, batch, group)

    monkeypatch.setattr(Dis2Booth, "loss", dying)
    assert cli.main(["train", *args, "--output", str(tmp_path / "b")]) == 130
    monkeypatch.setattr(Dis2Booth, "loss", original)
    assert cli.main(["train", *args, "--output", str(tmp_path / "b"), "--resume", "latest"]) == 0
    a = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_contextual_loss_by_hand():
    f = torch.randn(1, 5, 8)
    assert contextual_loss(f, f.clone()).item() == pytest.approx(0, abs=1e-6)  # every position finds itself
    assert contextual_loss(f, -f.clone()).item() == pytest.approx(0, abs=1e-6)  # |cos|: sign does not matter
    e = torch.eye(4)
    a, q = e[:2][None], e[2:][None]  # orthogonal positions
    assert contextual_loss(a, q).item() == pytest.approx(1.0)
    q2 = torch.stack([e[2:], torch.stack([e[0], e[3]])])  # second queued map contains a's first position
    assert contextual_loss(a, q2).item() == pytest.approx((1 + 0.5) / 2)


def test_delta_loss_threshold():
    x = torch.tensor([[[1.0, 0.0]]])
    close = torch.tensor([[[0.9, 0.1]]])
    far = torch.tensor([[[0.2, 1.0]]])
    cos_close = 0.9 / (0.81 + 0.01) ** 0.5
    assert delta_loss(x, close, 0.5).item() == pytest.approx(cos_close)
    assert delta_loss(x, far, 0.5).item() == 0.0
    assert delta_loss(x, torch.cat([close, far]), 0.5).item() == pytest.approx(cos_close / 2)


def test_feature_pooling_bounds_the_pair_count_by_averaging_neighbours():
    f = torch.randn(2, 128 * 128, 4)
    pooled = pool_positions(f, 256)
    assert pooled.shape == (2, 256, 4)
    # position (i, j) of the 16×16 result is the mean of block (i, j), 8×8, of the 128×128 map (positions row-major)
    blocks = f.reshape(2, 16, 8, 16, 8, 4).mean(dim=(2, 4)).reshape(2, 256, 4)
    torch.testing.assert_close(pooled, blocks)
    small = torch.randn(2, 64, 4)
    assert torch.equal(pool_positions(small, 256), small)  # few enough positions: kept as they are


def test_prior_preservation_draws_class_images_with_the_base_model_reuses_and_trains_on_them(tmp_path):
    import numpy as np
    from PIL import Image

    from personalize.generate import generate_images

    args = ["train", "--method", "dreambooth-lora", "--images", str(EXAMPLE_IMAGES), "--class-word", "cat",
            "--steps", "2", "--prior-preservation", "--num-class-images", "3", "--class-images", str(tmp_path / "cls"),
            "--num-validation-images", "0", "--inference-steps", "2", "--lr", "1e-2"]
    assert cli.main([*args, "--output", str(tmp_path / "a")]) == 0
    made = sorted(p.name for p in (tmp_path / "cls").iterdir())
    assert made == ["class-00000.png", "class-00001.png", "class-00002.png"]
    # The base model's own drawing of the class prompt, at the run's seed + 10000 + i.
    (expected,) = generate_images(load_backbone("tiny"), ["a photo of a cat"], [10_000 + 2], steps=2)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cls" / made[2])), np.asarray(expected))
    stamp = (tmp_path / "cls" / made[0]).stat().st_mtime_ns
    assert cli.main([*args, "--output", str(tmp_path / "b")]) == 0
    assert (tmp_path / "cls" / made[0]).stat().st_mtime_ns == stamp  # reused, not redrawn
    # The class images enter the loss: without their term (weight 0) the same run learns another LoRA.
    assert cli.main([*args, "--prior-loss-weight", "0", "--output", str(tmp_path / "c")]) == 0
    a, c = (load_file(str(tmp_path / run / "pytorch_lora_weights.safetensors")) for run in "ac")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_class_word_is_required(tmp_path, capsys):
    assert cli.main(["train", "--method", "dreambooth-lora", "--images", str(EXAMPLE_IMAGES), "--output",
                     str(tmp_path), "--steps", "1"]) == 2
    assert "--class-word is required" in capsys.readouterr().err


def test_generate_loads_run_folders_with_per_concept_scales(tmp_path):
    from personalize.generate import generate_images, install_concept

    for i, name in enumerate(["a", "b"]):
        backbone = load_backbone("tiny")
        backbone.freeze()
        method = DreamBoothLora(DreamBoothLoraConfig(class_word="cat", token=f"sks{name}"), backbone)
        with torch.no_grad():
            for p in method.lora_params.values():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.2)
        method.save(tmp_path / name, step=1)

    def images(*concepts):
        backbone = load_backbone("tiny")
        for path, scale in concepts:
            install_concept(backbone, path, lora_scale=scale)
        return torch.tensor(__import__("numpy").asarray(generate_images(backbone, ["a cat"], [0], steps=2)[0]), dtype=torch.float)

    base = images()
    assert torch.equal(images((tmp_path / "a", 0.0)), base)  # scale 0: no effect
    only_a, only_b = images((tmp_path / "a", 1.0)), images((tmp_path / "b", 1.0))
    both = images((tmp_path / "a", 1.0), (tmp_path / "b", 1.0))
    assert not torch.equal(only_a, base) and not torch.equal(both, only_a) and not torch.equal(both, only_b)
    with pytest.raises(Exception, match="neither"):
        install_concept(load_backbone("tiny"), tmp_path)


def test_a_lora_in_diffusers_pre_peft_layout_loads_as_a_file_and_acts(tmp_path):
    """diffusers 0.20-era scripts (SingleInsert's official code among them) save attention-processor LoRAs
    (`….processor.to_q_lora.down.weight`): `install_concept` recognises the file as a LoRA and it changes the output."""
    from safetensors.torch import save_file

    from personalize.generate import generate_images, install_concept

    unet = load_backbone("tiny").unet
    gen, state = torch.Generator().manual_seed(0), {}
    for name, module in unet.named_modules():
        if name.endswith(("attn1", "attn2")):
            for proj in ("to_q", "to_k", "to_v"):
                layer = getattr(module, proj)
                state[f"unet.{name}.processor.{proj}_lora.down.weight"] = torch.randn(2, layer.in_features, generator=gen) * 0.3
                state[f"unet.{name}.processor.{proj}_lora.up.weight"] = torch.randn(layer.out_features, 2, generator=gen) * 0.3
    assert state
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(state, str(path))

    def image(with_lora: bool):
        backbone = load_backbone("tiny")
        if with_lora:
            assert install_concept(backbone, path).startswith("LoRA")
        return torch.tensor(__import__("numpy").asarray(generate_images(backbone, ["a cat"], [0], steps=2)[0]), dtype=torch.float)

    assert not torch.equal(image(True), image(False))


@pytest.mark.parametrize("init", ["gaussian", "kaiming"])
def test_lora_init_sets_how_A_starts_and_every_adapter_starts_as_the_base_model(init):
    """gaussian: A ~ N(0, 1/r) (diffusers' scripts); kaiming: A ~ U(±1/√fan_in) (peft's default, kohya's); B = 0."""
    backbone = load_backbone("tiny")
    backbone.freeze()
    torch.manual_seed(0)
    method = DreamBoothLora(DreamBoothLoraConfig(class_word="cat", rank=4, lora_init=init), backbone)
    downs = [(n, m.lora_A["default"].weight) for n, m in backbone.unet.named_modules() if hasattr(m, "lora_A")]
    assert downs
    for name, a in downs:
        fan_in = a.shape[1]
        if init == "gaussian":
            assert abs(a.std().item() - 1 / 4) < 0.25 * 0.15, name
        else:
            assert a.abs().max().item() <= fan_in ** -0.5 + 1e-6, name
            assert abs(a.std().item() - (3 * fan_in) ** -0.5) < 0.2 * (3 * fan_in) ** -0.5, name
    ups = [m.lora_B["default"].weight for m in backbone.unet.modules() if hasattr(m, "lora_B")]
    assert all(b.abs().max().item() == 0 for b in ups)
    assert len(method.lora_params) == 2 * len(downs)


def test_lora_init_is_a_train_flag_and_refuses_unknown_values(tmp_path, capsys):
    common = ["train", "--method", "dreambooth-lora", "--model", "tiny", "--images", str(EXAMPLE_IMAGES), "--class-word", "cat",
              "--steps", "1", "--resolution", "32", "--output", str(tmp_path / "run")]
    with pytest.raises(SystemExit):
        cli.main([*common, "--lora-init", "uniform"])
    assert "kaiming" in capsys.readouterr().err
    assert not cli.main([*common, "--lora-init", "kaiming"])
    assert "lora_init: kaiming" in (tmp_path / "run" / "config.yaml").read_text().splitlines()
