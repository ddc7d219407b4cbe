"""SDXL's pooled text vector with a concept in the prompt. Training, plain diffusers (with the README's setting) and
A1111/Forge- or ComfyUI-style injection must all read it at end-of-text.

SDXL conditions on the pooled output of `text_encoder_2`. Its real config says `eos_token_id: 2`, and for that value
transformers pools at `argmax(input_ids)`. diffusers' `load_textual_inversion` adds the placeholder with an id above
49407, so there the pooled vector is the placeholder's. A1111 / Forge (`sd_hijack_clip.py`, `classic_engine.py`:
zeros at the placeholder's positions, vectors swapped in by the embedding module) and ComfyUI (`sd1_clip.py`
`SDClipModel.process_tokens` puts the vectors into the embedding sequence; `clip_model.py` `CLIPTextModel_` pools
at the end token) read it at end-of-text, and so does our training. The built-in `tiny-xl` says eos 49407 and
cannot show any of this. So these tests use encoders built from the shipped `random:sdxl` text-encoder configs, small
but with the real special-token ids.
"""

import json
import re

import torch
from torch import nn

from conftest import REPO
from personalize.architectures import config_folder
from personalize.backbone import Backbone
from personalize.concepts import FixedVectors, add_placeholder_tokens, concept_embedding
from personalize.tiny import build_tiny_pipeline

PROMPT = "a photo of <concept> on the beach"
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def real_config_encoder(folder: str, projection: bool):
    """A text encoder with the shipped SDXL config's special-token ids (eos 2, bos 0, pad 1) and tiny-xl's sizes, so that
    it fits tiny-xl's UNet."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = json.loads((config_folder("random:sdxl") / folder / "config.json").read_text())
    assert config["eos_token_id"] == 2  # the point of using it
    config.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    for key in ("architectures", "torch_dtype", "transformers_version"):
        config.pop(key)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**config))


def sdxl_with_real_text_configs():
    """tiny-xl with both text encoders built from SDXL's real configs (seeded: every call gives the same weights)."""
    pipe = build_tiny_pipeline("tiny-xl")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        pipe.text_encoder = real_config_encoder("text_encoder", projection=False)
        pipe.text_encoder_2 = real_config_encoder("text_encoder_2", projection=True)
    return pipe


def concept_vectors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 32, generator=g) for _ in range(2)]  # clip_l, clip_g


def trained_encoding(vectors, prompt=PROMPT):
    """(hidden states, pooled) as training computes them: ConceptEmbedding on the backbone's encoders."""
    backbone = Backbone(pipe=sdxl_with_real_text_configs(), name="sdxl-real-text-configs")
    for tokenizer, encoder, v in zip(backbone.tokenizers, backbone.text_encoders, vectors):
        first = add_placeholder_tokens(tokenizer, "<concept>", 1)[0]
        concept_embedding(encoder).add("<concept>", first, FixedVectors(v))
    with torch.no_grad():
        return backbone.encode_prompt(backbone.tokenize([prompt]))


def diffusers_encoding(pipe, prompt=PROMPT):
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
    return hidden, pooled


def readme_sdxl_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    (block,) = [b for b in blocks if b.startswith("# SDXL")]
    return block


def readme_end_of_text_setting() -> str:
    """The README SDXL block's line(s) that set the pooling position (what a user copies before drawing)."""
    lines = [line for line in readme_sdxl_block().splitlines() if "eos_token_id" in line]
    assert lines, "README's SDXL block sets no end-of-text id: plain diffusers pools SDXL's text at the placeholder"
    return "\n".join(lines)


def test_plain_diffusers_without_the_setting_pools_at_the_placeholder():
    """The premise: on the real config, load_textual_inversion alone gives the UNet another pooled vector than training
    (the sequence embeddings agree; only the pooled vector is off)."""
    vectors = concept_vectors()
    hidden, pooled = trained_encoding(vectors)
    pipe = sdxl_with_real_text_configs()
    pipe.load_textual_inversion(vectors[0], token="<concept>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vectors[1], token="<concept>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    plain_hidden, plain_pooled = diffusers_encoding(pipe)
    torch.testing.assert_close(plain_hidden, hidden, **TOLERANCE)
    assert (plain_pooled - pooled).abs().max() > 0.1


def test_readme_sdxl_snippet_pools_where_training_did(tmp_path, monkeypatch):
    """The README's SDXL block, run as written on the real SDXL text configs, conditions on the same pooled vector
    (and the same sequence) as training."""
    from test_readme import make_runs

    vectors = make_runs(tmp_path, "tiny-xl", "-xl")  # out/star-xl (the embedding), out/dog-xl (a UNet LoRA)
    monkeypatch.chdir(tmp_path)
    pipe = sdxl_with_real_text_configs()
    exec(compile(readme_sdxl_block(), "README.md (# SDXL)", "exec"), {"pipe": pipe})
    hidden, pooled = trained_encoding(vectors)
    readme_hidden, readme_pooled = diffusers_encoding(pipe)
    torch.testing.assert_close(readme_hidden, hidden, **TOLERANCE)
    torch.testing.assert_close(readme_pooled, pooled, **TOLERANCE)


class VectorsAtPositions(nn.Module):
    """A1111's `EmbeddingsWithFixes` / Forge's `CLIPEmbeddingForTextualInversion`: look the ids up, then overwrite the
    rows at the embedding's positions with its vectors. The ids there are 0, so they stay within the vocabulary."""

    def __init__(self, base: nn.Embedding, positions: list[int], vectors: torch.Tensor):
        super().__init__()
        self.base, self.positions, self.vectors = base, positions, vectors

    def forward(self, ids):
        embeds = self.base(ids).clone()
        embeds[:, self.positions] = self.vectors.to(embeds.dtype)
        return embeds


def injected_ids(tokenizer, prompt: str, num_vectors: int) -> tuple[torch.Tensor, list[int]]:
    """Token ids as A1111 lays them out: the text around the embedding's name, `[0] * n` where the name was, end of
    text, then padding (clip_g: "!", id 0)."""
    before, after = prompt.split("<concept>")
    words = lambda text: tokenizer(text, add_special_tokens=False).input_ids
    ids = [tokenizer.bos_token_id, *words(before), *[0] * num_vectors, *words(after), tokenizer.eos_token_id]
    start = 1 + len(words(before))
    ids += [tokenizer.pad_token_id] * (tokenizer.model_max_length - len(ids))
    return torch.tensor([ids]), list(range(start, start + num_vectors))


def test_a1111_forge_and_comfyui_style_injection_pool_where_training_did():
    """Vectors put in at prompt positions, ids left within the vocabulary, and the encoder's own pooling (Forge runs
    transformers with this very config). ComfyUI reads the final-normed state at the end token (`num_tokens - 1`)."""
    vectors = concept_vectors()
    hidden, pooled = trained_encoding(vectors)
    pipe = sdxl_with_real_text_configs()
    tokenizer, encoder = pipe.tokenizer_2, pipe.text_encoder_2
    ids, positions = injected_ids(tokenizer, PROMPT, num_vectors=1)
    encoder.set_input_embeddings(VectorsAtPositions(encoder.get_input_embeddings(), positions, vectors[1]))
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
        end = (ids[0] == tokenizer.eos_token_id).nonzero()[0, 0]  # ComfyUI: num_tokens counts up to the end token
        comfy_pooled = encoder.text_projection(out.last_hidden_state[:, end])
    torch.testing.assert_close(out.hidden_states[-2], hidden[..., 32:], **TOLERANCE)  # clip_g's half of the sequence
    torch.testing.assert_close(out.text_embeds, pooled, **TOLERANCE)  # A1111 / Forge
    torch.testing.assert_close(comfy_pooled, pooled, **TOLERANCE)  # ComfyUI


def test_singleinsert_on_sdxl_draws_in_diffusers_what_it_trained(tmp_path):
    """SingleInsert's files (its embedding, and its LoRA on the UNet and both text encoders) loaded as the README says,
    with its end-of-text setting, give the pooled vector and sequence that SingleInsert trained with."""
    from conftest import EXAMPLE_IMAGES
    from personalize.data import load_image_folder
    from personalize.methods import SingleInsert, SingleInsertConfig
    from safetensors.torch import load_file

    backbone = Backbone(pipe=sdxl_with_real_text_configs(), name="sdxl-real-text-configs")
    backbone.freeze()
    images = torch.stack([im.pixels for im in load_image_folder(EXAMPLE_IMAGES, 32)])[:1]
    method = SingleInsert(SingleInsertConfig(class_word="cat"), backbone, images=images)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as if trained: the image encoder's head and every LoRA start at zero
        for p in [*method.image_encoder.parameters(), *method.lora]:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    method.save(tmp_path, step=1)
    prompt = "a photo of <concept> cat"
    with torch.no_grad():
        hidden, pooled = backbone.encode_prompt(backbone.tokenize([prompt]))

    pipe = sdxl_with_real_text_configs()
    exec(readme_end_of_text_setting(), {"pipe": pipe})
    state = load_file(str(tmp_path / "learned_embeds.safetensors"))
    pipe.load_textual_inversion(state["clip_l"], token="<concept>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="<concept>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    pipe.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    drawn_hidden, drawn_pooled = diffusers_encoding(pipe, prompt)
    torch.testing.assert_close(drawn_hidden, hidden, **TOLERANCE)
    torch.testing.assert_close(drawn_pooled, pooled, **TOLERANCE)
