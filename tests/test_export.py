"""Exported embedding files work in other tools (plain diffusers, A1111's format) exactly as they do in ours,
are written atomically, and bad files fail with a message that names them."""

import os
import stat

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

import personalize.export as export
from personalize.backbone import Backbone, load_backbone
from personalize.errors import PersonalizeError
from personalize.export import EMBEDDINGS_FILE, load_embedding_file, save_embeddings
from personalize.generate import generate_images, install_concept
from personalize.howto import HOWTO_FILE
from personalize.tiny import build_tiny_pipeline

STEPS, GUIDANCE, SIZE, SEED = 2, 7.5, 32, 0


def _sample(pipe, prompt: str) -> np.ndarray:
    """One 2-step 32x32 image as float numpy, fixed seed: the call both paths share."""
    with torch.no_grad():
        return pipe(
            prompt,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=torch.Generator().manual_seed(SEED),
            height=SIZE,
            width=SIZE,
            output_type="np",
        ).images


def _vectors(n: int, d: int = 32, seed: int = 0) -> torch.Tensor:
    """Random vectors with a large norm, so that a concept visibly changes the image."""
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 5


def _assert_visibly_different(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert np.abs(a - b).max() > 1e-3, "the concept did not change the image"


# -- 1. diffusers file: plain diffusers and our injection draw the same image ----------------------------------


@pytest.mark.parametrize("source", ["folder", "file"])
@pytest.mark.parametrize("num_vectors", [1, 2])
def test_diffusers_file_loads_in_plain_diffusers_and_matches_our_injection(tmp_path, num_vectors, source):
    vecs = _vectors(num_vectors)
    files = save_embeddings(tmp_path / "run", "<concept>", [vecs], step=7, model_name="tiny")
    learned = tmp_path / "run" / EMBEDDINGS_FILE
    assert learned in files
    state = load_file(str(learned))
    assert list(state) == ["<concept>"] and torch.equal(state["<concept>"], vecs)
    token = next(iter(state))
    prompt = f"a photo of {token}"

    plain = build_tiny_pipeline("tiny")
    without = _sample(plain, prompt)
    plain.load_textual_inversion(str(tmp_path / "run" if source == "folder" else learned))
    if num_vectors == 2:  # diffusers' multi-vector naming, which our placeholders follow
        assert f"{token}_1" in plain.tokenizer.get_vocab()
        assert plain.maybe_convert_prompt(prompt, plain.tokenizer) == f"a photo of {token} {token}_1"
    theirs = _sample(plain, prompt)
    _assert_visibly_different(theirs, without)

    backbone = load_backbone("tiny")
    assert install_concept(backbone, tmp_path / "run" if source == "folder" else learned) == token
    ours = _sample(backbone.pipe, prompt)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)

    # generate_images (what `personalize generate` and validation call) draws that same image.
    (image,) = generate_images(backbone, [prompt], [SEED], steps=STEPS, guidance=GUIDANCE, resolution=SIZE)
    expected = (theirs[0] * 255).round().astype(np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - expected).max() <= 1


def test_diffusers_file_records_metadata(tmp_path):
    save_embeddings(tmp_path, "<concept>", [_vectors(2)], step=123, model_name="tiny")
    from safetensors import safe_open

    with safe_open(str(tmp_path / EMBEDDINGS_FILE), "pt") as f:
        meta = f.metadata()
    assert meta == {"token": "<concept>", "num_vectors": "2", "step": "123", "base_model": "tiny"}


# -- 2. A1111 .pt ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_vectors", [1, 2])
def test_a1111_pt_is_weights_only_loadable_and_loads_in_diffusers(tmp_path, num_vectors):
    vecs = _vectors(num_vectors, seed=3)
    files = save_embeddings(tmp_path / "my-cat", "<concept>", [vecs], step=50, model_name="tiny")
    pt = tmp_path / "my-cat" / "my-cat-emb.pt"  # named after the run's folder, not the token
    assert pt in files

    back = torch.load(pt, map_location="cpu", weights_only=True)
    assert torch.equal(back["string_to_param"]["*"], vecs)
    assert back["name"] == "my-cat-emb"  # A1111 names it after the file; diffusers after `name`: the same word
    assert back["step"] == 50
    # Our own reader names it after the file's `name`, in brackets.
    token, (read,) = load_embedding_file(pt)
    assert token == "<my-cat-emb>" and torch.equal(read, vecs)

    prompt = "a photo of <a1111>"
    plain = build_tiny_pipeline("tiny")
    without = _sample(plain, prompt)
    plain.load_textual_inversion(str(pt), token="<a1111>")
    theirs = _sample(plain, prompt)
    _assert_visibly_different(theirs, without)

    backbone = load_backbone("tiny")
    assert install_concept(backbone, pt, token="<a1111>") == "<a1111>"
    np.testing.assert_allclose(_sample(backbone.pipe, prompt), theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("run", ["star", "concept", "my-cat"])
def test_a1111_name_is_no_vocabulary_word_and_loads_in_diffusers_under_it(tmp_path, run):
    """A1111 and diffusers call an A1111 embedding by its name: a vocabulary word there (a run called "star") would
    be refused by diffusers and take over that word in every A1111 prompt."""
    vecs = _vectors(1, seed=4)
    pt, = [f for f in save_embeddings(tmp_path / run, "<concept>", [vecs], step=1, model_name="tiny") if f.suffix == ".pt"]
    name = pt.stem
    assert torch.load(pt, weights_only=True)["name"] == name

    plain = build_tiny_pipeline("tiny")
    vocab = plain.tokenizer.get_vocab()
    assert name not in vocab and f"{name}</w>" not in vocab
    word = run
    # A1111 finds an embedding by the token ids of its name: the run's bare word must not spell it.
    assert plain.tokenizer(name, add_special_tokens=False).input_ids != plain.tokenizer(word, add_special_tokens=False).input_ids

    prompt = f"a photo of {name}"
    without = _sample(plain, prompt)
    plain.load_textual_inversion(str(pt))  # no token=: diffusers takes the file's name, as A1111 does
    assert name in plain.tokenizer.get_vocab()
    _assert_visibly_different(_sample(plain, prompt), without)


def test_sdxl_a1111_name_is_no_vocabulary_word_of_either_tokenizer(tmp_path):
    files = save_embeddings(tmp_path / "star", "<concept>", [_vectors(1), _vectors(1, seed=1)], step=1, model_name="tiny-xl")
    name = files[1].stem
    assert files[1].suffix == ".safetensors" and name == "star-emb"
    pipe = build_tiny_pipeline("tiny-xl")
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        assert name not in tokenizer.get_vocab() and f"{name}</w>" not in tokenizer.get_vocab()


def test_runs_with_the_default_token_name_their_a1111_files_after_the_run_so_none_overwrites_another(tmp_path):
    """Issue 24, point 2: A1111 and ComfyUI keep every embedding in one folder, by file name. Every run with the
    default token used to write `concept-emb.pt`, so a second run copied there replaced the first; the file is now
    named after the run's folder (the UI's concept name), made typeable, and is still no vocabulary word."""
    folders = ["my-cat", "my-dog", "Mon chat été", "v1.5 cat", "猫", "犬"]
    pts = [save_embeddings(tmp_path / "runs" / folder, "<concept>", [_vectors(1, seed=i)], step=1, model_name="tiny")[1]
           for i, folder in enumerate(folders)]
    names = [pt.name for pt in pts]
    assert names[:4] == ["my-cat-emb.pt", "my-dog-emb.pt", "Mon-chat-ete-emb.pt", "v1-5-cat-emb.pt"]
    assert len(set(names)) == len(names)  # all six copied into one embeddings/ folder: none overwrites another
    vocab = build_tiny_pipeline("tiny").tokenizer.get_vocab()
    for pt in pts:
        assert torch.load(pt, weights_only=True)["name"] == pt.stem  # diffusers' word is A1111's word
        assert pt.stem not in vocab and f"{pt.stem}</w>" not in vocab
        assert list(load_file(str(pt.parent / EMBEDDINGS_FILE))) == ["<concept>"]  # diffusers' file keeps the token


def _howto_blocks(run) -> dict[str, str]:
    """HOW-TO-USE.txt as {file: what it says about that file} (a file's block starts with its path)."""
    blocks = (run / HOWTO_FILE).read_text().split("\n\n")
    return {block.splitlines()[0]: block for block in blocks[2:] if block.strip()}


def test_howto_note_says_per_file_where_it_goes_and_what_to_type(tmp_path):
    """A TI+LoRA run in `runs/my cat`: the note beside the files names each one, where it goes in A1111 / ComfyUI /
    diffusers, and the word to type there (the token in diffusers, the file's name in A1111 and ComfyUI)."""
    from personalize.methods import TextualInversion, TextualInversionConfig

    run = tmp_path / "runs" / "my cat"
    method = TextualInversion(TextualInversionConfig(init_word="cat", lora_rank=2), load_backbone("tiny"))
    files = method.save(run, step=1)
    assert [f.name for f in files] == [EMBEDDINGS_FILE, "my-cat-emb.pt", "pytorch_lora_weights.safetensors",
                                       "my-cat.kohya.safetensors", HOWTO_FILE]
    summary = (run / HOWTO_FILE).read_text().split("\n\n")[1]
    assert "diffusers, personalize generate: <concept>" in summary
    assert "A1111 / Forge: my-cat-emb" in summary and "<lora:my-cat.kohya:1>" in summary
    assert "ComfyUI: embedding:my-cat-emb" in summary
    blocks = _howto_blocks(run)
    assert set(blocks) == {f.name for f in files[:-1]}
    assert 'pipe.load_textual_inversion("RUN_FOLDER"), then write <concept>' in blocks[EMBEDDINGS_FILE]
    a1111 = blocks["my-cat-emb.pt"]
    assert "copy into embeddings/, then write my-cat-emb" in a1111 and "models/embeddings/" in a1111
    assert "embedding:my-cat-emb" in a1111 and 'load_textual_inversion("RUN_FOLDER/my-cat-emb.pt")' in a1111
    assert 'load_lora_weights("RUN_FOLDER", weight_name="pytorch_lora_weights.safetensors")' in blocks["pytorch_lora_weights.safetensors"]
    kohya = blocks["my-cat.kohya.safetensors"]
    assert "models/Lora/" in kohya and "add <lora:my-cat.kohya:1> to the prompt and write my-cat-emb" in kohya
    assert "models/loras/" in kohya and "LoraLoader" in kohya and "embedding:my-cat-emb" in kohya


# -- 3. SDXL clip_l / clip_g -------------------------------------------------------------------------------------


def test_sdxl_file_loads_per_encoder_in_diffusers_and_matches_our_injection(tmp_path):
    clip_l, clip_g = _vectors(2, seed=10), _vectors(2, seed=11)  # different, so a swapped encoder would show
    files = save_embeddings(tmp_path / "run", "<concept>", [clip_l, clip_g], step=1, model_name="tiny-xl")
    learned, a1111 = tmp_path / "run" / EMBEDDINGS_FILE, tmp_path / "run" / "run-emb.safetensors"
    assert files == [learned, a1111]
    state = load_file(str(learned))
    assert set(state) == {"clip_l", "clip_g"}
    assert torch.equal(state["clip_l"], clip_l) and torch.equal(state["clip_g"], clip_g)
    a1111_state = load_file(str(a1111))
    assert a1111_state.keys() == state.keys() and all(torch.equal(a1111_state[k], state[k]) for k in state)

    prompt = "a photo of <concept>"
    plain = build_tiny_pipeline("tiny-xl")
    without = _sample(plain, prompt)
    # The documented diffusers pattern for SDXL embeddings.
    plain.load_textual_inversion(state["clip_g"], token="<concept>", text_encoder=plain.text_encoder_2, tokenizer=plain.tokenizer_2)
    plain.load_textual_inversion(state["clip_l"], token="<concept>", text_encoder=plain.text_encoder, tokenizer=plain.tokenizer)
    theirs = _sample(plain, prompt)
    _assert_visibly_different(theirs, without)

    for path in (learned, a1111):  # the run's file and the A1111/ComfyUI copy install the same
        backbone = load_backbone("tiny-xl")
        assert install_concept(backbone, path) == "<concept>"
        # Pooled text goes to the SDXL UNet; both paths must pool at the real end of text (eos 49407 here).
        assert all(enc.config.eos_token_id == 49407 for enc in backbone.text_encoders)
        np.testing.assert_allclose(_sample(backbone.pipe, prompt), theirs, atol=1e-5, rtol=0)


def _with_old_clip_eos(pipe):
    """Give the encoders the eos_token_id = 2 that real SD 1.x/SDXL configs carry (transformers then pools at argmax(ids))."""
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.config.eos_token_id = 2
        for module in (encoder, getattr(encoder, "text_model", None)):  # transformers 5.x / 4.x keep it here
            if module is not None and hasattr(module, "eos_token_id"):
                module.eos_token_id = 2
    return pipe


def test_sdxl_old_eos_config_does_not_move_our_pooled_output(tmp_path):
    """With real SDXL's eos_token_id = 2, pooling at argmax(ids) would pick the placeholder (the largest id) and
    feed the UNet a corrupted pooled vector; our backbone must pool at the end of text, as with a correct config."""
    save_embeddings(tmp_path, "<concept>", [_vectors(1, seed=12), _vectors(1, seed=13)], step=1, model_name="tiny-xl")
    prompt = "<concept> on a table"
    reference = load_backbone("tiny-xl")
    install_concept(reference, tmp_path)
    expected = _sample(reference.pipe, prompt)

    old = Backbone(pipe=_with_old_clip_eos(build_tiny_pipeline("tiny-xl")), name="tiny-xl")
    install_concept(old, tmp_path)
    np.testing.assert_allclose(_sample(old.pipe, prompt), expected, atol=1e-5, rtol=0)


# -- 4. atomic writes ------------------------------------------------------------------------------------------


def _half_then_disk_full(tensors, filename, metadata=None):
    data = safetensors.torch.save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data[: len(data) // 2])
    raise OSError(28, "No space left on device")


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_disk_full_leaves_no_file_and_no_temp_file(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "save_file", _half_then_disk_full)
    out = tmp_path / "run"
    with pytest.raises(PersonalizeError) as info:
        save_embeddings(out, "<concept>", [_vectors(1)], step=1, model_name="tiny")
    assert str(out / EMBEDDINGS_FILE) in str(info.value)
    assert "No space left on device" in str(info.value)
    assert not (out / EMBEDDINGS_FILE).exists()
    assert list(out.iterdir()) == []  # no half file, no temp file, and the .pt was not written after the failure


def test_disk_full_keeps_the_previous_good_file(tmp_path, monkeypatch):
    good, run = _vectors(1, seed=1), tmp_path / "run"
    save_embeddings(run, "<concept>", [good], step=1, model_name="tiny")
    before = _snapshot(run)
    assert set(before) == {EMBEDDINGS_FILE, "run-emb.pt"}

    monkeypatch.setattr(export, "save_file", _half_then_disk_full)
    with pytest.raises(PersonalizeError, match="learned_embeds.safetensors"):
        save_embeddings(run, "<concept>", [_vectors(1, seed=2)], step=2, model_name="tiny")
    assert _snapshot(run) == before
    assert torch.equal(load_embedding_file(run)[1][0], good)


def test_disk_full_while_writing_the_a1111_file(tmp_path, monkeypatch):
    good, run = _vectors(1, seed=1), tmp_path / "run"
    save_embeddings(run, "<concept>", [good], step=1, model_name="tiny")
    old_pt = (run / "run-emb.pt").read_bytes()

    def half_torch_save(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(old_pt[: len(old_pt) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export.torch, "save", half_torch_save)
    with pytest.raises(PersonalizeError) as info:
        save_embeddings(run, "<concept>", [_vectors(1, seed=2)], step=2, model_name="tiny")
    assert str(run / "run-emb.pt") in str(info.value)
    assert (run / "run-emb.pt").read_bytes() == old_pt
    assert sorted(p.name for p in run.iterdir()) == sorted([EMBEDDINGS_FILE, "run-emb.pt"])


def test_interrupted_write_leaves_no_temp_file(tmp_path, monkeypatch):
    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_embeddings(tmp_path, "<concept>", [_vectors(1)], step=1, model_name="tiny")
    assert list(tmp_path.iterdir()) == []


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        files = save_embeddings(tmp_path, "<concept>", [_vectors(1)], step=1, model_name="tiny")
    finally:
        os.umask(old)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


# -- 5. unreadable / unfitting files ---------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(PersonalizeError, match="nope.safetensors"):
        load_embedding_file(missing)
    with pytest.raises(PersonalizeError, match="nope.safetensors"):
        install_concept(load_backbone("tiny"), missing)


def test_two_unrelated_tensors_are_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({"a.weight": torch.zeros(2, 32), "b.bias": torch.zeros(32)}, str(path))
    with pytest.raises(PersonalizeError) as info:
        load_embedding_file(path)
    assert str(path) in str(info.value)
    assert "a.weight" in str(info.value)


@pytest.mark.parametrize(
    "name, content",
    [
        ("garbage.safetensors", b"\x07\x00\x00\x00\x00\x00\x00\x00not json at all"),
        ("truncated.safetensors", "half"),
        ("garbage.pt", b"PK\x03\x04 this is not a zip archive"),
        ("empty.bin", b""),
    ],
)
def test_corrupt_files_raise_an_error_naming_them(tmp_path, name, content):
    path = tmp_path / name
    if content == "half":
        data = safetensors.torch.save({"<c>": torch.randn(2, 32)})
        content = data[: len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(PersonalizeError) as info:
        load_embedding_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", [torch.randn(1, 32), torch.randn(32)], ids=["matrix", "vector"])
def test_a_bare_tensor_pt_is_read_as_one_embedding(tmp_path, content):
    """diffusers' load_textual_inversion accepts a file holding only a tensor; so do we (a 1-d one is one vector)."""
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    token, (vectors,) = load_embedding_file(path, token="<t>")
    assert token == "<t>" and torch.equal(vectors, content.reshape(1, 32))
    assert load_embedding_file(path)[0] == "<odd>"  # without a token: named after the file


def test_a_file_of_several_tensors_loads_the_one_the_token_names(tmp_path):
    """The official BaTex code saves its vector beside its weights and basis ({"<concept>": [d], "weight_vector": ...,
    "candidate_embedding_matrix": ..., "vocab_ids": ...}): passing the token picks it; without one it is refused."""
    path = tmp_path / "learned_embeds.bin"
    concept = torch.randn(32)
    torch.save({"<concept>": concept, "weight_vector": torch.randn(8, 1), "candidate_embedding_matrix": torch.randn(8, 32),
                "vocab_ids": torch.arange(8)}, path)
    token, (vectors,) = load_embedding_file(path, token="<concept>")
    assert token == "<concept>" and torch.equal(vectors, concept.reshape(1, 32))
    with pytest.raises(PersonalizeError, match="the token you pass"):
        load_embedding_file(path)


def test_a_pickle_that_is_no_embedding_is_refused_naming_it(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(PersonalizeError) as info:
        load_embedding_file(path, token="<t>")
    assert str(path) in str(info.value) and "list" in str(info.value)


def test_wrong_dimension_is_refused_before_touching_the_tokenizer(tmp_path):
    save_embeddings(tmp_path, "<wide>", [_vectors(1, d=64)], step=1, model_name="other")
    backbone = load_backbone("tiny")
    with pytest.raises(PersonalizeError) as info:
        install_concept(backbone, tmp_path)
    message = str(info.value)
    assert "64" in message and "32" in message
    assert "<wide>" not in backbone.tokenizers[0].get_vocab()


def test_sd1_file_into_sdxl_is_refused(tmp_path):
    save_embeddings(tmp_path, "<c>", [_vectors(1)], step=1, model_name="tiny")
    with pytest.raises(PersonalizeError, match="text encoder"):
        install_concept(load_backbone("tiny-xl"), tmp_path / EMBEDDINGS_FILE)


# -- 6. several concepts at once -------------------------------------------------------------------------------


def test_two_installed_concepts_both_act_and_match_diffusers(tmp_path):
    save_embeddings(tmp_path / "a", "<cat-toy>", [_vectors(2, seed=20)], step=1, model_name="tiny")
    save_embeddings(tmp_path / "b", "<my-style>", [_vectors(1, seed=21)], step=1, model_name="tiny")
    prompt = "a <cat-toy> in the style of <my-style>"

    both = load_backbone("tiny")
    assert install_concept(both, tmp_path / "a") == "<cat-toy>"
    assert install_concept(both, tmp_path / "b") == "<my-style>"
    out_both = _sample(both.pipe, prompt)

    for only in ("a", "b"):
        single = load_backbone("tiny")
        install_concept(single, tmp_path / only)
        _assert_visibly_different(out_both, _sample(single.pipe, prompt))

    plain = build_tiny_pipeline("tiny")
    plain.load_textual_inversion(str(tmp_path / "a"))
    plain.load_textual_inversion(str(tmp_path / "b"))
    np.testing.assert_allclose(out_both, _sample(plain, prompt), atol=1e-5, rtol=0)


def test_the_toy_models_text_encoder_loads_whole_on_every_supported_transformers():
    """The shipped toy text encoder is stored as published checkpoints are (`text_model.` keys): transformers 4
    (CI's oldest-versions leg runs this file) silently re-initialised the layout transformers 5 writes."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    from personalize.architectures import text_encoder_state_for
    from personalize.toyworld import TOY_MODEL_DIR

    stored = load_file(str(TOY_MODEL_DIR / "text_encoder" / "model.safetensors"))
    model = CLIPTextModel.from_pretrained(TOY_MODEL_DIR / "text_encoder")
    own = model.state_dict()
    mapped = text_encoder_state_for(model, stored)
    assert own.keys() == mapped.keys()
    assert all(torch.equal(own[k].to(v.dtype), v) for k, v in mapped.items())


def test_the_toy_model_loads_in_plain_diffusers_on_every_supported_stack():
    """The tokenizer folder ships vocab.json and merges.txt as published SD folders do: transformers 4's
    CLIPTokenizer (what model_index.json names) cannot be built from tokenizer.json alone."""
    from diffusers import StableDiffusionPipeline

    from personalize.toyworld import TOY_MODEL_DIR

    pipe = StableDiffusionPipeline.from_pretrained(TOY_MODEL_DIR)
    assert pipe.tokenizer("a blue striped star on a pink background, top").input_ids == [
        49406, 320, 1746, 22192, 1565, 525, 320, 3360, 5994, 267, 1253, 49407]
    assert pipe.tokenizer("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
