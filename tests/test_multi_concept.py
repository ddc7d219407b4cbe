"""Several concepts in one run, from a dataset file: one embedding per concept (TI, BaTex), one LoRA for all."""

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import EXAMPLE_IMAGES
from personalize import cli
from personalize.backbone import load_backbone
from personalize.generate import generate_images, install_concept
from personalize.methods import Concept, DreamBoothLora, TextualInversion
from personalize.latents import LatentCache


def folders(tmp_path):
    photos = sorted(EXAMPLE_IMAGES.glob("*.jpg"))
    for name, chosen in (("a", photos[:2]), ("b", photos[3:5])):
        (tmp_path / name).mkdir()
        for photo in chosen:
            shutil.copy(photo, tmp_path / name / photo.name)
    return tmp_path / "a", tmp_path / "b"


def train(*args, expect=0):
    assert cli.main(["train", *map(str, args)]) == expect


def test_textual_inversion_learns_one_embedding_per_concept_in_the_format_of_a_run_of_its_own(tmp_path, monkeypatch):
    a, b = folders(tmp_path)
    (tmp_path / "set.toml").write_text(
        '[[subsets]]\nimages = "a"\ntoken = "<a>"\ninit_word = "cat"\n\n'
        '[[subsets]]\nimage_dir = "b"\ntoken = "<b>"\ninit_word = "dog"\nnum_repeats = 2\n')
    seen = []
    original = TextualInversion.loss

    def spy(self, batch, group):
        seen.append(batch.image_indices.tolist())
        return original(self, batch, group)

    monkeypatch.setattr(TextualInversion, "loss", spy)
    common = ["--batch-size", 2, "--num-validation-images", 0, "--lr", "1e-3", "--steps", 4]
    train("--dataset", tmp_path / "set.toml", "--output", tmp_path / "both", *common)
    train("--images", a, "--token", "<a>", "--init-word", "cat", "--output", tmp_path / "alone", *common)

    for name in ("a", "b"):
        folder = tmp_path / "both" / "concepts" / name
        assert sorted(p.name for p in folder.iterdir()) == [f"both-{name}-emb.pt", "learned_embeds.safetensors"]
        assert list(load_file(str(folder / "learned_embeds.safetensors"))) == [f"<{name}>"]
    alone = load_file(str(tmp_path / "alone" / "learned_embeds.safetensors"))["<a>"]
    both = load_file(str(tmp_path / "both" / "concepts" / "a" / "learned_embeds.safetensors"))["<a>"]
    assert both.shape == alone.shape and both.dtype == alone.dtype  # the format of a run of its own
    tokenizer = load_backbone("tiny").tokenizers[0]
    cat, dog = (load_backbone("tiny").text_encoders[0].get_input_embeddings().weight[tokenizer(w, add_special_tokens=False).input_ids[0]]
                for w in ("cat", "dog"))
    vb = load_file(str(tmp_path / "both" / "concepts" / "b" / "learned_embeds.safetensors"))["<b>"][0]
    assert (vb - dog).norm() < (vb - cat).norm()  # <b> started from its own init word

    backbone = load_backbone("tiny")
    assert "<a>" in install_concept(backbone, tmp_path / "both") and "<b>" in install_concept(load_backbone("tiny"), tmp_path / "both")
    draw_a, draw_b = (np.asarray(generate_images(backbone, [f"a photo of {t}"], [0], steps=2)[0], dtype=float) for t in ("<a>", "<b>"))
    assert np.abs(draw_a - draw_b).max() > 1  # each concept draws differently
    assert {i for rows in seen[:4] for i in rows} & {0, 1} and {i for rows in seen[:4] for i in rows} & {2, 3}  # both subsets train


def test_lora_methods_learn_one_lora_with_each_subsets_prompt(tmp_path):
    a, b = folders(tmp_path)
    (tmp_path / "set.yaml").write_text(
        "subsets:\n"
        f"  - {{images: {a}, token: sks, class_word: cat}}\n"
        f"  - {{images: {b}, token: zwx, class_word: dog, caption: 'a painting of {{token}} {{class_word}}'}}\n")
    train("--method", "dreambooth-lora", "--dataset", tmp_path / "set.yaml", "--output", tmp_path / "o",
          "--batch-size", 2, "--num-validation-images", 0, "--steps", 2)
    assert (tmp_path / "o" / "pytorch_lora_weights.safetensors").is_file()
    assert not (tmp_path / "o" / "concepts").exists()  # one LoRA for all
    from personalize.configs import build_configs
    from personalize.data import Subset, read_dataset

    subsets = read_dataset(tmp_path / "set.yaml")
    assert subsets[1] == Subset(str(b), "zwx", "dog", None, "a painting of {token} {class_word}")
    backbone = load_backbone("tiny")
    _, method_cfg = build_configs(["--method", "dreambooth-lora", "--class-word", "cat"])
    method = DreamBoothLora(method_cfg, backbone, captions=[None, None, "a painting of zwx dog", "a painting of zwx dog"],
                            image_concepts=[0, 0, 1, 1], concepts=[Concept("sks", "cat"), Concept("zwx", "dog")])
    expected = ["a photo of sks cat", "a photo of sks cat", "a painting of zwx dog", "a painting of zwx dog"]
    assert torch.equal(method.instance_ids[0], backbone.tokenize(expected)[0])


def test_repeats_make_a_subsets_images_that_much_more_frequent():
    backbone = load_backbone("tiny")
    cache = LatentCache(backbone, [torch.zeros(3, 32, 32)] * 3, False, "cpu", repeats=[1, 1, 4])
    g = torch.Generator().manual_seed(0)
    drawn = torch.cat([cache.sample(50, g)[1] for _ in range(40)])
    share = (drawn == 2).float().mean().item()
    assert share == pytest.approx(4 / 6, abs=0.03)


def test_dataset_errors_name_the_problem(tmp_path, capsys):
    a, b = folders(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[subsets]]\nimages = "a"\ncolour = "red"\n')
    train("--dataset", bad, "--output", tmp_path / "o1", "--init-word", "cat", expect=2)
    assert "unknown key(s) colour" in capsys.readouterr().err
    two = tmp_path / "two.toml"
    two.write_text('[[subsets]]\nimages = "a"\n\n[[subsets]]\nimages = "b"\n')
    train("--dataset", two, "--output", tmp_path / "o2", "--init-word", "cat", expect=2)
    assert "every subset needs a token of its own" in capsys.readouterr().err
    train("--method", "singleinsert", "--dataset", two, "--output", tmp_path / "o3", "--class-word", "cat", expect=2)
    assert "learns one concept per run" in capsys.readouterr().err
    train("--dataset", two, "--images", a, "--output", tmp_path / "o4", "--init-word", "cat", expect=2)
    assert "either --images" in capsys.readouterr().err
