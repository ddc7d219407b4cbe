"""Base-model loading and the prediction-type maths."""

import time

import pytest
import torch

from personalize.backbone import load_backbone
from personalize.errors import PersonalizeError


@pytest.mark.parametrize("name, kind", [("tiny", "epsilon"), ("tiny-v", "v_prediction"), ("tiny-xl", "epsilon")])
def test_tiny_models_load_with_their_prediction_type(name, kind):
    backbone = load_backbone(name)
    assert backbone.prediction_type == kind
    assert backbone.is_sdxl == (name == "tiny-xl")
    assert backbone.default_resolution == 32
    assert len(backbone.tokenizers[0]) == 49408  # the real CLIP vocabulary
    assert backbone.tokenizers[0]("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_tiny_tokenizers_are_independent_copies_of_the_real_clip_tokenizer():
    """clip_tokenizer's copies share the template's BPE vocabulary (a whole copy costs 0.2 s): each must still read
    text as the template does, and a token added to one must reach neither the template nor any other copy."""
    from personalize.tiny import _tokenizer_template, clip_tokenizer

    template = _tokenizer_template()
    a, b = clip_tokenizer(), clip_tokenizer(pad_token="!")
    text = "A large RED striped star, on the left!! <|endoftext|> émoji 😀 zzqxj"
    assert a.get_vocab() == b.get_vocab() == template.get_vocab() and a(text).input_ids == b(text).input_ids == template(text).input_ids
    assert (a.pad_token, b.pad_token, template.pad_token) == ("<|endoftext|>", "!", "<|endoftext|>")
    a.add_tokens(["<concept>"])
    assert a("a <concept> cat").input_ids == [49406, 320, 49408, 2368, 49407]
    assert all("<concept>" not in t.get_vocab() and len(t) == 49408 for t in (template, b, clip_tokenizer()))


@pytest.mark.parametrize("name", ["tiny", "tiny-v"])
def test_target_and_x0_are_consistent_for_both_prediction_types(name):
    """A perfect prediction of the target must give back x0 exactly, whatever the parametrisation."""
    backbone = load_backbone(name)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([1, 250, 600, 999])
    noisy = backbone.add_noise(x0, noise, t)
    target = backbone.target(x0, noise, t)
    torch.testing.assert_close(backbone.predict_x0(noisy, target, t), x0, rtol=1e-4, atol=1e-4)
    if name == "tiny":
        assert torch.equal(target, noise)
    else:  # v = α_t ε − σ_t x0
        a = backbone.noise_scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - backbone.noise_scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        torch.testing.assert_close(target, a * noise - s * x0)


def test_saved_folder_loads_back_as_a_diffusers_model(tmp_path):
    load_backbone("tiny").pipe.save_pretrained(tmp_path / "m")
    again = load_backbone(str(tmp_path / "m"))
    assert again.prediction_type == "epsilon" and len(again.tokenizers[0]) == 49408


@pytest.mark.parametrize(
    "spec, message",
    [
        ("some-org/some-model", "not in the local Hugging Face cache"),
        ("/nowhere/model.safetensors", "does not exist"),
        ("./missing-folder", "does not exist"),
        ("not a model", "neither a built-in name"),
    ],
)
def test_missing_models_fail_fast_and_say_what_to_pass(spec, message):
    start = time.monotonic()
    with pytest.raises(PersonalizeError, match=message) as err:
        load_backbone(spec)
    assert time.monotonic() - start < 5  # the CLI promises "within a second"; leave CI headroom
    assert "--model toy or tiny" in str(err.value)


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(PersonalizeError, match="model_index.json"):
        load_backbone(str(tmp_path))


def test_broken_single_file_checkpoint_names_the_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PersonalizeError, match="model.safetensors"):
        load_backbone(str(bad))


@pytest.mark.parametrize("sdxl", [False, True])
def test_single_file_checkpoint_picks_the_family_and_passes_the_config(tmp_path, monkeypatch, sdxl):
    """Dispatch only: a real SD checkpoint cannot be made here (no weights, no LDM-format writer in diffusers)."""
    import diffusers
    from safetensors.torch import save_file

    key = "conditioner.embedders.1.model.ln_final.weight" if sdxl else "cond_stage_model.transformer.x"
    ckpt = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(1)}, str(ckpt))
    calls = []
    tiny = load_backbone("tiny-xl" if sdxl else "tiny").pipe
    for cls in (diffusers.StableDiffusionPipeline, diffusers.StableDiffusionXLPipeline):
        monkeypatch.setattr(cls, "from_single_file", classmethod(lambda c, path, **kw: calls.append((c.__name__, path, kw)) or tiny))
    backbone = load_backbone(str(ckpt), model_config=str(tmp_path / "cfg"))
    name, path, kwargs = calls[0]
    assert name == ("StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline")
    assert path == str(ckpt) and kwargs["config"] == str(tmp_path / "cfg")
    assert backbone.is_sdxl == sdxl
