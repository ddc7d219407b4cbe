"""DreamBooth-LoRA and Dis²Booth: files that load in diffusers and draw the same, sub-step isolation, the losses."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import EXAMPLE_IMAGES
from personalize import cli
from personalize.backbone import load_backbone
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
    for f in files:  # diffusers file and kohya file
        pipe = build_tiny_pipeline(model)
        pipe.load_lora_weights(str(f))
        assert abs(draw(pipe) - ours).max() < 1e-4, f.name
    meta = load_file(str(files[0]))
    assert any(k.startswith("unet.") and ".lora_A." in k for k in meta)
    assert any(k.startswith("text_encoder") for k in meta) == text_encoder


def test_dis2booth_fused_lora_equals_the_two_adapters(tmp_path):
    backbone = load_backbone("tiny")
    backbone.freeze()
    method = Dis2Booth(Dis2BoothConfig(class_word="cat", rank=4, anchor_weight=0.7, delta_weight=0.4), backbone)
    method._split()
    randomise(method)
    ours = draw(backbone.pipe)
    method.save(tmp_path, step=1)
    fused = build_tiny_pipeline("tiny")
    fused.load_lora_weights(str(tmp_path / "pytorch_lora_weights.safetensors"))
    parts = build_tiny_pipeline("tiny")
    parts.load_lora_weights(str(tmp_path / "anchor"), adapter_name="anchor")
    parts.load_lora_weights(str(tmp_path / "delta"), adapter_name="delta")
    parts.set_adapters(["anchor", "delta"], adapter_weights=[0.7, 0.4])
    kohya = build_tiny_pipeline("tiny")
    kohya.load_lora_weights(str(tmp_path / "sks.kohya.safetensors"))
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
    method._split()
    torch.testing.assert_close(draw(backbone.pipe), before, atol=1e-5, rtol=0)


def test_each_sub_step_updates_only_its_own_adapter(tmp_path, monkeypatch):
    """Through the real trainer: snapshot every LoRA weight before each sub-step; what changed must be that group's."""
    seen = []
    original = Dis2Booth.loss

    def spy(self, batch, group):
        if seen:  # what the previous sub-step's optimiser step changed
            last_group, last = seen[-1]
            changed = {k.split("__")[0] for k, p in self.lora_params.items() if not torch.equal(p, last[k])}
            owner = {"warmup": {"anchor"}, "anchor": {"anchor"}, "delta": {"delta"}}[last_group]
            assert changed == owner, (last_group, changed)
        result = original(self, batch, group)  # (the first anchor sub-step splits the warm-up LoRA here)
        seen.append((group, {k: p.detach().clone() for k, p in self.lora_params.items()}))
        return result

    monkeypatch.setattr(Dis2Booth, "loss", spy)
    assert cli.main(["train", "--method", "dis2booth", "--images", str(EXAMPLE_IMAGES), "--class-word", "cat",
                     "--output", str(tmp_path), "--steps", "3", "--warmup-steps", "1", "--delta-steps", "2",
                     "--rank", "4", "--lr", "1e-2", "--batch-size", "2", "--num-validation-images", "0"]) == 0
    assert [g for g, _ in seen] == ["warmup", "anchor", "delta", "delta", "anchor", "delta", "delta"]


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


def test_feature_pooling_bounds_the_pair_count():
    f = torch.randn(2, 128 * 128, 4)
    assert pool_positions(f, 256).shape == (2, 256, 4)
    assert pool_positions(torch.randn(2, 64, 4), 256).shape == (2, 64, 4)


def test_prior_preservation_generates_and_reuses_class_images(tmp_path):
    args = ["train", "--method", "dreambooth-lora", "--images", str(EXAMPLE_IMAGES), "--class-word", "cat",
            "--steps", "2", "--prior-preservation", "--num-class-images", "3", "--class-images", str(tmp_path / "cls"),
            "--num-validation-images", "0", "--inference-steps", "2"]
    assert cli.main([*args, "--output", str(tmp_path / "a")]) == 0
    made = sorted(p.name for p in (tmp_path / "cls").iterdir())
    assert made == ["class-00000.png", "class-00001.png", "class-00002.png"]
    stamp = (tmp_path / "cls" / made[0]).stat().st_mtime_ns
    assert cli.main([*args, "--output", str(tmp_path / "b")]) == 0
    assert (tmp_path / "cls" / made[0]).stat().st_mtime_ns == stamp  # reused, not redrawn


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
