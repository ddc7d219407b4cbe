"""Real-size architectures with random weights (`random:sd15`, `random:sd21`, `random:sdxl`).

Fast: the shipped configs carry the real models' numbers; the builder writes a folder diffusers loads, the same
bytes for the same seed, and `random:NAME` reaches it through the ordinary folder loader. One real-size run in
CI: Textual Inversion with a LoRA (TI+LoRA: an embedding and a UNet LoRA, both exported and read back) for 2 steps
on `random:sd15` at 64 px — the full 860 M-parameter UNet, small images: about 10 s, 5.5 GiB of RAM, and once
10-30 s to build the folder (2.0 GiB in the test cache). All five methods took 105 s together, over CI's budget:
the other methods and SD 2.1 / SDXL run in `benchmarks/full_size.py --check` (minutes; 14-18 GiB RAM for SDXL).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import EXAMPLE_IMAGES
from personalize import architectures, cli
from personalize.architectures import build_folder, config_folder, random_model_folder, write_safetensors
from personalize.backbone import load_backbone, model_folder
from personalize.errors import PersonalizeError
from personalize.tiny import build_tiny_pipeline


def read(spec: str, component: str, file: str = "config.json") -> dict:
    return json.loads((config_folder(spec) / component / file).read_text())


# -- the shipped configs ---------------------------------------------------------------------------------------


def test_sd15_configs_are_stable_diffusion_1_5():
    unet, text = read("random:sd15", "unet"), read("random:sd15", "text_encoder")
    assert unet["cross_attention_dim"] == 768 and unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert unet["attention_head_dim"] == 8 and unet["sample_size"] * 8 == 512 and unet["layers_per_block"] == 2
    assert (text["hidden_size"], text["num_hidden_layers"], text["hidden_act"]) == (768, 12, "quick_gelu")
    assert read("random:sd15", "scheduler", "scheduler_config.json")["_class_name"] == "PNDMScheduler"
    assert read("random:sd15", "tokenizer", "tokenizer_config.json")["pad_token"] == "<|endoftext|>"
    assert read("random:sd15", "vae")["block_out_channels"] == [128, 256, 512, 512]


def test_sd21_configs_are_stable_diffusion_2_1_768_v():
    unet, text = read("random:sd21", "unet"), read("random:sd21", "text_encoder")
    assert read("random:sd21", "scheduler", "scheduler_config.json")["prediction_type"] == "v_prediction"
    assert unet["cross_attention_dim"] == 1024 and unet["attention_head_dim"] == [5, 10, 20, 20]
    assert unet["use_linear_projection"] and unet["upcast_attention"] and unet["sample_size"] * 8 == 768
    assert (text["hidden_size"], text["num_hidden_layers"], text["hidden_act"]) == (1024, 23, "gelu")
    assert read("random:sd21", "tokenizer", "tokenizer_config.json")["pad_token"] == "!"  # OpenCLIP pads with "!"


def test_sdxl_configs_are_sdxl_base_1_0():
    unet = read("random:sdxl", "unet")
    one, two = read("random:sdxl", "text_encoder"), read("random:sdxl", "text_encoder_2")
    assert unet["addition_embed_type"] == "text_time" and unet["cross_attention_dim"] == 768 + 1280 == 2048
    assert unet["transformer_layers_per_block"] == [1, 2, 10] and unet["block_out_channels"] == [320, 640, 1280]
    assert unet["projection_class_embeddings_input_dim"] == 6 * unet["addition_time_embed_dim"] + 1280
    assert (one["hidden_size"], two["hidden_size"], two["num_hidden_layers"], two["projection_dim"]) == (768, 1280, 32, 1280)
    assert two["architectures"] == ["CLIPTextModelWithProjection"]
    assert read("random:sdxl", "tokenizer", "tokenizer_config.json")["pad_token"] == "<|endoftext|>"
    assert read("random:sdxl", "tokenizer_2", "tokenizer_config.json")["pad_token"] == "!"
    assert read("random:sdxl", "vae")["scaling_factor"] == 0.13025


def test_the_configs_build_networks_of_the_real_parameter_counts():
    """On the meta device (no memory, no weights): the published sizes of the real models' networks."""
    counts = {"random:sd15": {"unet": 859_520_964, "text_encoder": 123_060_480},
              "random:sd21": {"unet": 865_910_724, "text_encoder": 340_387_840},
              "random:sdxl": {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}}
    for spec, expected in counts.items():
        index = json.loads((config_folder(spec) / "model_index.json").read_text())
        for component, count in {**expected, "vae": 83_653_863}.items():
            library, name = index[component]
            model = architectures._empty_model(architectures._component_class(library, name), library,
                                               config_folder(spec) / component)
            assert sum(t.numel() for t in model.state_dict().values()) == count, (spec, component)


def test_shipped_components_are_the_ones_model_index_names():
    for name in architectures.ARCHITECTURES:
        folder = config_folder(f"random:{name}")
        index = json.loads((folder / "model_index.json").read_text())
        named = {k for k, v in index.items() if isinstance(v, list) and v[0] is not None}
        shipped = {p.name for p in folder.iterdir() if p.is_dir() and p.name != "__pycache__"}
        assert shipped == named, name  # every component model_index.json names is shipped (none named but absent)


@pytest.mark.parametrize("name", list(architectures.ARCHITECTURES))
def test_the_built_folder_loads_in_plain_diffusers(name, tmp_path):
    """`DiffusionPipeline.from_pretrained(folder)` with no arguments, as a user of plain diffusers would call it, on
    the shipped model_index.json, scheduler, tokenizer and feature-extractor configs with the networks' configs
    swapped for a tiny model's (same classes, KB instead of GiB), built by the same `build_folder`."""
    from diffusers import DiffusionPipeline

    configs = tmp_path / "configs"
    shutil.copytree(config_folder(f"random:{name}"), configs)
    tiny = tmp_path / "tiny"
    build_tiny_pipeline("tiny-xl" if name == "sdxl" else "tiny").save_pretrained(tiny)
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if (configs / component).is_dir():
            shutil.copyfile(tiny / component / "config.json", configs / component / "config.json")
    build_folder(configs, tmp_path / "built")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "built")
    index = json.loads((configs / "model_index.json").read_text())
    assert type(pipe).__name__ == index["_class_name"]
    for component, entry in index.items():
        if isinstance(entry, list):
            assert (getattr(pipe, component) is None) == (entry[0] is None), component
    assert list(pipe.unet.config.block_out_channels) == list(json.loads((tiny / "unet" / "config.json").read_text())["block_out_channels"])


def test_unknown_random_model_names_the_shipped_ones():
    with pytest.raises(PersonalizeError, match="random:sd15, random:sd21, random:sdxl"):
        load_backbone("random:sd3")
    assert model_folder("random:sd21") == config_folder("random:sd21")  # configs readable without building


# -- the builder, on a tiny architecture -----------------------------------------------------------------------


@pytest.fixture
def tiny_xl_configs(tmp_path):
    """tiny-xl's configs as a diffusers folder without weights or vocabulary (the shape of the shipped folders)."""
    folder = tmp_path / "configs"
    build_tiny_pipeline("tiny-xl").save_pretrained(folder)
    for f in [*folder.rglob("*.safetensors"), *folder.rglob("vocab.json"), *folder.rglob("merges.txt"), *folder.rglob("tokenizer.json")]:
        f.unlink()
    return folder


def test_built_folder_loads_and_the_same_seed_writes_the_same_bytes(tiny_xl_configs, tmp_path):
    build_folder(tiny_xl_configs, tmp_path / "a")
    build_folder(tiny_xl_configs, tmp_path / "b")
    build_folder(tiny_xl_configs, tmp_path / "c", seed=1)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "a" / weights).read_bytes() == (tmp_path / "b" / weights).read_bytes()
    assert (tmp_path / "a" / weights).read_bytes() != (tmp_path / "c" / weights).read_bytes()
    backbone = load_backbone(str(tmp_path / "a"))
    assert backbone.is_sdxl and backbone.tokenizers[1].pad_token == "!" and backbone.tokenizers[0].pad_token == "<|endoftext|>"
    assert backbone.tokenize(["a photo of a cat"])[0][0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    fresh = build_tiny_pipeline("tiny-xl").unet.state_dict()
    loaded = backbone.unet.state_dict()
    assert loaded.keys() == fresh.keys() and all(loaded[k].shape == fresh[k].shape for k in fresh)
    with torch.no_grad():
        prompt, pooled = backbone.encode_prompt(backbone.tokenize(["a cat"]))
        out = backbone.unet_forward(torch.randn(1, 4, 8, 8), torch.tensor([500]), prompt, pooled)
    assert torch.isfinite(out).all() and out.abs().mean() > 0


def test_text_encoders_are_written_as_published_checkpoints_and_load_whole(tiny_xl_configs, tmp_path):
    """Keys under `text_model.` (but the projection), as in the published SD/SDXL folders: transformers 4 — our
    oldest supported version, and kohya's stack — loads only that layout and silently re-initialises any other."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    build_folder(tiny_xl_configs, tmp_path / "a")
    for component, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        stored = load_file(str(tmp_path / "a" / component / "model.safetensors"))
        assert all(k.startswith(("text_model.", "text_projection.")) for k in stored), component
        loaded = architectures.text_encoder_state_for(cls.from_pretrained(tmp_path / "a" / component), stored)
        model = cls.from_pretrained(tmp_path / "a" / component).state_dict()
        assert all(torch.equal(model[loaded_key].to(stored[k].dtype), stored[k])
                   for k, loaded_key in zip(stored, loaded)), component  # every weight from the file, none fresh
    assert "text_projection.weight" in load_file(str(tmp_path / "a" / "text_encoder_2" / "model.safetensors"))


def test_streamed_safetensors_read_back_exactly(tmp_path):
    tensors = {"b.weight": torch.randn(3, 5), "a.bias": torch.randn(7), "c": torch.randn(2, 1, 3, 3)}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        path = tmp_path / f"{dtype}.safetensors"
        write_safetensors(path, {k: tuple(v.shape) for k, v in tensors.items()}, lambda k: tensors[k], dtype)
        back = load_file(str(path))
        assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k].to(dtype)) for k in tensors)
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == {"format": "pt"}


def test_random_name_is_built_once_into_the_cache_and_loaded_as_a_folder(tiny_xl_configs, tmp_path, monkeypatch):
    import diffusers

    shutil.copytree(tiny_xl_configs, tmp_path / "shipped" / "tinyxl")
    monkeypatch.setattr(architectures, "CONFIG_ROOT", tmp_path / "shipped")
    monkeypatch.setitem(architectures.ARCHITECTURES, "tinyxl", "tiny-xl's configs")
    monkeypatch.setenv("PERSONALIZE_CACHE", str(tmp_path / "cache"))
    loaded_from = []
    original = diffusers.DiffusionPipeline.from_pretrained.__func__

    def spy(cls, path, **kwargs):
        loaded_from.append(Path(path))
        return original(cls, path, **kwargs)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(spy))
    backbone = load_backbone("random:tinyxl")
    folder = random_model_folder("random:tinyxl")
    assert loaded_from == [folder] and folder.parent == tmp_path / "cache" / "random-models"
    assert str(backbone.pipe.config._name_or_path) == str(folder) and backbone.is_sdxl
    stamp = (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    load_backbone("random:tinyxl")  # the second time: no build
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left behind


# -- real size: SD 1.5 ---------------------------------------------------------------------------------------


def test_textual_inversion_with_lora_trains_and_exports_on_random_sd15(tmp_path):
    """The full SD 1.5 UNet and text encoder: an embedding 768 wide and a LoRA on all 128 attention projections."""
    out = tmp_path / "run"
    assert cli.main(["train", "--method", "textual-inversion", "--model", "random:sd15", "--images", str(EXAMPLE_IMAGES),
                     "--output", str(out), "--init-word", "cat", "--lora-rank", "4", "--resolution", "64",
                     "--batch-size", "1", "--steps", "2", "--num-validation-images", "0"]) == 0
    assert load_file(str(out / "learned_embeds.safetensors"))["<concept>"].shape == (1, 768)
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert len(lora) == 2 * 128 and lora["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"].shape == (4, 768)
    kohya = next(out.glob("*.kohya.safetensors"))
    with safe_open(str(kohya), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sd_v1" and f.metadata()["ss_v2"] == "False"
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
