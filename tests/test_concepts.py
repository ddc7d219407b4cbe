"""The one injection mechanism: any position, any batch size, several vectors and concepts, both SDXL encoders."""

import pytest
import torch

from personalize.backbone import load_backbone
from personalize.concepts import FixedVectors, FreeVectors, add_placeholder_tokens, concept_embedding, expand_prompt
from personalize.errors import PersonalizeError


def _install(backbone, token, vectors_per_encoder):
    for vec, tok, enc in zip(vectors_per_encoder, backbone.tokenizers, backbone.text_encoders):
        first = add_placeholder_tokens(tok, token, vec.shape[0])[0]
        concept_embedding(enc).add(token, first, FixedVectors(vec))


def test_injected_vector_equals_plain_word_embedding_at_any_position_and_batch_row():
    """A concept whose vector is exactly the embedding of 'dog' encodes every prompt exactly like 'dog' does."""
    backbone = load_backbone("tiny")
    tok, enc = backbone.tokenizers[0], backbone.text_encoders[0]
    dog = enc.get_input_embeddings().weight[tok("dog", add_special_tokens=False).input_ids[0]]
    _install(backbone, "<c>", [dog[None].clone()])
    with_concept = ["<c>", "a photo of a <c> on the beach", "two friends: <c> and a cat"]
    plain = [p.replace("<c>", "dog") for p in with_concept]
    with torch.no_grad():
        a, _ = backbone.encode_prompt(backbone.tokenize(with_concept))
        b, _ = backbone.encode_prompt(backbone.tokenize(plain))
    torch.testing.assert_close(a, b)


def test_gradient_reaches_only_the_concept_and_vocabulary_is_untouched():
    backbone = load_backbone("tiny")
    backbone.freeze()
    enc = backbone.text_encoders[0]
    table_before = enc.get_input_embeddings().weight.clone()
    source = FreeVectors(torch.randn(2, 32))
    first = add_placeholder_tokens(backbone.tokenizers[0], "<c>", 2)[0]
    concept_embedding(enc).add("<c>", first, source)
    prompts = [expand_prompt(p, "<c>", 2) for p in ["a <c>", "<c> in snow", "nothing here"]]
    embeds, _ = backbone.encode_prompt(backbone.tokenize(prompts))
    embeds.sum().backward()
    assert source.value.grad.abs().sum() > 0
    assert [p for p in enc.parameters() if p.grad is not None and p is not source.value] == []
    assert torch.equal(enc.get_input_embeddings().weight, table_before)
    assert enc.get_input_embeddings().weight.shape[0] == 49408  # never resized


def test_rows_without_the_placeholder_are_unchanged():
    backbone = load_backbone("tiny")
    prompts = ["a photo of a cat", "a red car"]
    with torch.no_grad():
        before, _ = backbone.encode_prompt(backbone.tokenize(prompts))
        _install(backbone, "<c>", [torch.randn(1, 32) * 3])
        after, _ = backbone.encode_prompt(backbone.tokenize(prompts + ["a <c>"]))
    torch.testing.assert_close(after[:2], before)


def test_two_concepts_in_one_prompt_each_get_their_own_vectors():
    backbone = load_backbone("tiny")
    tok, enc = backbone.tokenizers[0], backbone.text_encoders[0]
    table = enc.get_input_embeddings().weight
    cat, car = (table[tok(w, add_special_tokens=False).input_ids[0]][None].clone() for w in ("cat", "car"))
    _install(backbone, "<a>", [cat])
    _install(backbone, "<b>", [car])
    with torch.no_grad():
        a, _ = backbone.encode_prompt(backbone.tokenize(["a <a> next to a <b>"]))
        b, _ = backbone.encode_prompt(backbone.tokenize(["a cat next to a car"]))
    torch.testing.assert_close(a, b)


def test_sdxl_both_encoders_and_pooled_output_follow_the_concept():
    backbone = load_backbone("tiny-xl")
    vecs = []
    for tok, enc in zip(backbone.tokenizers, backbone.text_encoders):
        vecs.append(enc.get_input_embeddings().weight[tok("dog", add_special_tokens=False).input_ids[0]][None].clone())
    _install(backbone, "<c>", vecs)
    with torch.no_grad():
        a, pooled_a = backbone.encode_prompt(backbone.tokenize(["a <c> in the park"]))
        b, pooled_b = backbone.encode_prompt(backbone.tokenize(["a dog in the park"]))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(pooled_a, pooled_b)


def test_old_clip_config_pools_at_end_of_text_not_at_the_placeholder():
    """SD's configs say eos_token_id=2: transformers then pools at argmax(ids), i.e. the placeholder."""
    from personalize.tiny import build_tiny_pipeline
    from personalize.backbone import Backbone

    pipe = build_tiny_pipeline("tiny-xl")
    for enc in (pipe.text_encoder, pipe.text_encoder_2):
        enc.config.eos_token_id = 2
        for m in (enc, getattr(enc, "text_model", None)):
            if m is not None and hasattr(m, "eos_token_id"):
                m.eos_token_id = 2
    backbone = Backbone(pipe=pipe, name="tiny-xl-old-config")
    vecs = [enc.get_input_embeddings().weight[tok("dog", add_special_tokens=False).input_ids[0]][None].clone()
            for tok, enc in zip(backbone.tokenizers, backbone.text_encoders)]
    _install(backbone, "<c>", vecs)
    with torch.no_grad():
        _, pooled_a = backbone.encode_prompt(backbone.tokenize(["a <c> in the park"]))
        _, pooled_b = backbone.encode_prompt(backbone.tokenize(["a dog in the park"]))
    torch.testing.assert_close(pooled_a, pooled_b)


def test_placeholder_that_is_already_a_word_is_refused():
    backbone = load_backbone("tiny")
    with pytest.raises(PersonalizeError, match="already a word"):
        add_placeholder_tokens(backbone.tokenizers[0], "cat", 1)
    add_placeholder_tokens(backbone.tokenizers[0], "<c>", 1)
    with pytest.raises(PersonalizeError, match="already a word"):
        add_placeholder_tokens(backbone.tokenizers[0], "<c>", 1)


def test_id_to_slot_table_is_built_once_and_rebuilt_when_concepts_change():
    """Built per step it costs two host-to-device copies (a GPU sync); it must follow every change of concepts."""
    backbone = load_backbone("tiny")
    tok, enc = backbone.tokenizers[0], backbone.text_encoders[0]
    _install(backbone, "<a>", [torch.randn(2, 32)])
    module = concept_embedding(enc)
    ids = backbone.tokenize([expand_prompt("a <a>", "<a>", 2)])[0]
    first = module(ids)
    table = module._lookup
    torch.testing.assert_close(module(ids), first)
    assert module._lookup is table  # reused
    b = torch.randn(1, 32)
    _install(backbone, "<b>", [b])
    both = module(backbone.tokenize(["<b> and " + expand_prompt("<a>", "<a>", 2)])[0])
    assert module._lookup is not table  # rebuilt for the new concept
    torch.testing.assert_close(both[0, 1], b[0])
    torch.testing.assert_close(both[0, 3:5], first[0, 2:4])
    module.remove("<b>")
    torch.testing.assert_close(module(ids), first)
