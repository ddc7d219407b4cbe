"""Half precision stays finite, a NaN stops the run with nothing lost, and the memory options change memory, not
results: gradient checkpointing, cached text embeddings, 8-bit AdamW's clear refusal off CUDA."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import EXAMPLE_IMAGES
from personalize import cli
from personalize.backbone import load_backbone
from personalize.losses import denoise, diffusion_loss
from personalize.methods import DreamBoothLora, DreamBoothLoraConfig, TextualInversion


def train(*args, expect=0):
    assert cli.main(["train", *map(str, args)]) == expect


def common(out, *extra):
    return ["--images", EXAMPLE_IMAGES, "--output", out, "--batch-size", 2, "--num-validation-images", 0, *extra]


@pytest.mark.parametrize("model", ["tiny", "tiny-v", "tiny-xl"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_steps_are_finite_and_trainable_weights_stay_fp32(tmp_path, model, precision, monkeypatch):
    dtypes = []
    original = TextualInversion.loss

    def spy(self, batch, group):
        dtypes.append({p.dtype for p in self.parameters() if p.requires_grad})
        return original(self, batch, group)

    monkeypatch.setattr(TextualInversion, "loss", spy)
    train(*common(tmp_path / "ti", "--model", model, "--mixed-precision", precision, "--init-word", "cat", "--steps", 3))
    train(*common(tmp_path / "lora", "--model", model, "--mixed-precision", precision, "--method", "dreambooth-lora",
                  "--class-word", "cat", "--steps", 3))
    for run in ("ti", "lora"):
        rows = [json.loads(line) for line in (tmp_path / run / "logs.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert dtypes and all(d == {torch.float32} for d in dtypes)  # frozen networks in half, trained weights in fp32


def test_a_nan_stops_the_run_before_the_weights_change_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    args = common(tmp_path / "run", "--init-word", "cat", "--steps", 6, "--checkpointing-steps", 2)
    train(*common(tmp_path / "straight", "--init-word", "cat", "--steps", 6, "--checkpointing-steps", 2))
    calls = {"n": 0}
    original = TextualInversion.loss

    def poisoned(self, batch, group):
        calls["n"] += 1
        loss, logs = original(self, batch, group)
        return (loss * float("nan") if calls["n"] == 3 else loss), logs  # step 3: the gradient becomes NaN

    monkeypatch.setattr(TextualInversion, "loss", poisoned)
    train(*args, expect=2)
    err = capsys.readouterr().err
    assert "at step 3" in err and "step-000002" in err and "--resume latest" in err
    status = json.loads((tmp_path / "run" / "run.json").read_text())
    assert status["status"] == "failed" and "step 3" in status["error"]
    kept = load_file(str(tmp_path / "run" / "checkpoints" / "step-000002" / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in kept.values())
    monkeypatch.setattr(TextualInversion, "loss", original)
    train(*args, "--resume", "latest")  # nothing lost: the run finishes as if never poisoned
    a = load_file(str(tmp_path / "straight" / "learned_embeds.safetensors"))
    b = load_file(str(tmp_path / "run" / "learned_embeds.safetensors"))
    assert torch.equal(a["<concept>"], b["<concept>"])


@pytest.mark.parametrize("model", ["tiny", "tiny-xl"])
def test_gradient_checkpointing_recomputes_and_changes_no_gradient(model, monkeypatch):
    from diffusers.models.resnet import ResnetBlock2D

    backbone = load_backbone(model)
    backbone.freeze()
    method = DreamBoothLora(DreamBoothLoraConfig(class_word="cat"), backbone)  # its LoRA on the real targets
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ids = backbone.tokenize(["a photo of sks cat"] * 2)
    calls = {"n": 0}
    forward = ResnetBlock2D.forward

    def counted(self, *args, **kwargs):  # forward hooks do not fire on recomputation; the method itself runs
        calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ResnetBlock2D, "forward", counted)

    def gradients():
        calls["n"] = 0
        loss = diffusion_loss(denoise(backbone, latents, ids, torch.Generator().manual_seed(1),
                                      backbone.default_time_ids(2, 32) if backbone.is_sdxl else None))
        grads = torch.autograd.grad(loss, list(method.lora_params.values()))
        return loss.detach(), grads, calls["n"]

    plain_loss, plain, plain_calls = gradients()
    backbone.enable_gradient_checkpointing()
    ckpt_loss, ckpt, ckpt_calls = gradients()
    assert ckpt_calls > plain_calls  # blocks ran again in the backward pass instead of keeping their activations
    torch.testing.assert_close(ckpt_loss, plain_loss)
    for a, b in zip(ckpt, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cached_text_embeddings_encode_each_prompt_once_and_train_the_same(tmp_path, monkeypatch):
    backbone_cls = type(load_backbone("tiny"))
    encoded = []
    original = backbone_cls._encode

    def count(self, input_ids):
        encoded.append(len(input_ids[0]))
        return original(self, input_ids)

    monkeypatch.setattr(backbone_cls, "_encode", count)
    args = ["--method", "dreambooth-lora", "--class-word", "cat", "--steps", 4, "--lr", "1e-2"]
    train(*common(tmp_path / "cached", *args))  # the default for DreamBooth-LoRA without a text-encoder LoRA
    cached_calls, encoded[:] = list(encoded), []
    train(*common(tmp_path / "plain", *args, "--no-cache-text-embeddings"))
    assert cached_calls == [1]  # one prompt ("a photo of sks cat"), encoded once
    assert encoded == [2, 2, 2, 2]  # every step otherwise
    a = load_file(str(tmp_path / "cached" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "plain" / "pytorch_lora_weights.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    train(*common(tmp_path / "ti", "--init-word", "cat", "--steps", 1, "--cache-text-embeddings"), expect=2)


def test_eight_bit_adam_is_refused_clearly_off_cuda(tmp_path, capsys):
    train(*common(tmp_path, "--init-word", "cat", "--steps", 1, "--optimizer", "adamw8bit"), expect=2)
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_non_finite_vae_latents_stop_with_the_fix_named(tmp_path, monkeypatch, capsys):
    """SDXL's VAE overflows in fp16: latents that are not finite must stop the run before training on them."""
    from personalize.backbone import Backbone

    original = Backbone.encode_images
    monkeypatch.setattr(Backbone, "encode_images", lambda self, pixels: tuple(t * float("inf") for t in original(self, pixels)))
    train(*common(tmp_path, "--model", "tiny-xl", "--init-word", "cat", "--steps", 1), expect=2)
    err = capsys.readouterr().err
    assert "inf/NaN latents" in err and "sdxl-vae-fp16-fix" in err
