"""The README's diffusers snippets run as written, on files made with the tiny models: README and code cannot
drift apart (a changed path, file name or call fails here)."""

import re

import numpy as np
import pytest
import torch

from conftest import REPO
from personalize.backbone import load_backbone
from personalize.export import save_embeddings
from personalize.methods import DreamBoothLora, DreamBoothLoraConfig
from personalize.tiny import build_tiny_pipeline

PROMPT = "a photo of <concept> and a sks dog"


def readme_block(first_line: str) -> str:
    """The one ```python block of README.md that starts with `first_line`."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"README.md has {len(found)} python blocks starting {first_line!r}"
    return found[0]


def make_runs(root, model: str, suffix: str) -> list[torch.Tensor]:
    """The run folders the README's blocks name: an embedding run (`<concept>`) and a LoRA run (`sks dog`)."""
    backbone = load_backbone(model)
    backbone.freeze()
    g = torch.Generator().manual_seed(0)
    vectors = [torch.randn(1, d, generator=g) * 5 for d in backbone.embedding_dims]  # clip_l, clip_g differ
    save_embeddings(root / "out" / f"star{suffix}", "<concept>", vectors, step=1, model_name=model)
    method = DreamBoothLora(DreamBoothLoraConfig(class_word="dog"), backbone)
    with torch.no_grad():
        for p in method.lora_params.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    method.save(root / "out" / f"dog{suffix}", step=1)
    return vectors


def draw(pipe):
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.mark.parametrize("model, first_line, suffix", [
    ("tiny", "# SD 1.x / 2.x", ""),
    ("tiny-xl", "# SDXL", "-xl"),
])
def test_readme_loading_snippet_runs_and_loads_each_file(tmp_path, monkeypatch, model, first_line, suffix):
    block = readme_block(first_line)
    vectors = make_runs(tmp_path, model, suffix)
    monkeypatch.chdir(tmp_path)  # the README's paths are relative to where the runs were made
    pipe = build_tiny_pipeline(model)
    exec(compile(block, f"README.md ({first_line})", "exec"), {"pipe": pipe})

    # Each embedding row went into its own encoder (SDXL: clip_l into text_encoder, clip_g into text_encoder_2) ...
    tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    for tokenizer, encoder, vector in zip(tokenizers, encoders, vectors):
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<concept>")]
        torch.testing.assert_close(row, vector[0])
    if model == "tiny":  # ... the A1111 file's name, the run's, is its token ...
        torch.testing.assert_close(
            pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("star-emb")], vectors[0][0])
    assert [n for names in pipe.get_list_adapters().values() for n in names]  # ... and the LoRA is loaded
    assert np.abs(draw(pipe) - draw(build_tiny_pipeline(model))).max() > 1e-3
