"""Metrics: arithmetic on hand-made embeddings, tiny random CLIP / ViT models end to end, masks, LPIPS, FID."""

import math
import time

import numpy as np
import pytest
import torch
from PIL import Image

from personalize.errors import PersonalizeError
from personalize.evaluate import metrics as M


def _noise_image(seed: int, size=(40, 32)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# --------------------------------------------------------------------------------------------- cosine


def test_cosine_identical_orthogonal_and_scale_invariant():
    a = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]])
    b = torch.tensor([[2.0, 4.0, 6.0], [0.0, 5.0, 0.0]])
    m = M.cosine_matrix(a, b)
    assert m.shape == (2, 2)
    assert m[0, 0] == pytest.approx(1.0, abs=1e-6)  # same direction, different length
    assert m[1, 1] == pytest.approx(0.0, abs=1e-7)  # orthogonal
    assert M.cosine_matrix(a, a).diagonal().tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


def test_mean_pairwise_cosine_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # cos: [[1, 1/√2], [0, 1/√2]] -> mean (1 + √2) / 4
    assert M.mean_pairwise_cosine(a, b) == pytest.approx((1 + math.sqrt(2)) / 4, abs=1e-6)
    with pytest.raises(PersonalizeError):
        M.mean_pairwise_cosine(a[:0], b)


# --------------------------------------------------------------------------------------------- CLIP-T arithmetic


def test_clip_t_conventions_on_hand_made_embeddings():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.2, math.sqrt(1 - 0.04)]])  # cos 1, -1, 0.2
    assert M.clip_t_from_embeddings(image, text, "raw") == pytest.approx((1 - 1 + 0.2) / 3, abs=1e-6)
    # negative cosine clamps to 0; factor 2.5
    assert M.clip_t_from_embeddings(image, text, "clipscore") == pytest.approx((2.5 + 0 + 0.5) / 3, abs=1e-6)
    with pytest.raises(ValueError):
        M.clip_t_from_embeddings(image, text, "clip-score")


def test_clip_t_method_pairs_image_i_with_prompt_i(monkeypatch):
    scorer = M.ClipScorer.__new__(M.ClipScorer)  # no model: embeddings are faked
    monkeypatch.setattr(scorer, "image_embeddings", lambda images: torch.eye(2), raising=False)
    monkeypatch.setattr(scorer, "text_embeddings", lambda prompts: torch.tensor([[0.0, 1.0], [0.0, 1.0]]), raising=False)
    # pairs: (e0, e1) -> 0, (e1, e1) -> 1; a cross-pair mean would give 0.5 as well, so check clipscore too
    assert scorer.clip_t([None, None], ["a", "b"]) == pytest.approx(0.5)
    assert scorer.clip_t([None, None], ["a", "b"], convention="clipscore") == pytest.approx(1.25)
    monkeypatch.setattr(scorer, "text_embeddings", lambda prompts: torch.tensor([[1.0, 0.0], [0.0, -1.0]]), raising=False)
    assert scorer.clip_t([None, None], ["a", "b"]) == pytest.approx(0.0)  # 1 and -1
    assert scorer.clip_t([None, None], ["a", "b"], convention="clipscore") == pytest.approx(1.25)
    with pytest.raises(PersonalizeError):
        scorer.clip_t([None], ["a", "b"])


def test_prompt_for_clip_t_modes():
    prompt = "a photo of <cat-toy> on the beach"
    assert M.prompt_for_clip_t(prompt, "<cat-toy>") == "a photo of on the beach"
    assert M.prompt_for_clip_t(prompt, "<cat-toy>", "keep") == prompt
    assert M.prompt_for_clip_t(prompt, "<cat-toy>", "class", "toy") == "a photo of toy on the beach"
    assert M.prompt_for_clip_t("<x>, in the snow", "<x>") == ", in the snow"
    assert M.prompt_for_clip_t("a cartoon drawing of <x>.", "<x>") == "a cartoon drawing of."
    assert M.prompt_for_clip_t("a  <x>  dog", "<x>") == "a dog"
    with pytest.raises(PersonalizeError):
        M.prompt_for_clip_t(prompt, "<cat-toy>", "class")
    with pytest.raises(PersonalizeError):
        M.prompt_for_clip_t("a photo of a dog", "<cat-toy>")


def test_clipscore_captions_carry_the_reference_code_prefix():
    """CLIPScore's clipscore.py reads "A photo depicts " + caption; the raw cosine reads the text as it is."""
    assert M.clip_t_caption("a photo of on the beach", "clipscore") == "A photo depicts a photo of on the beach"
    assert M.clip_t_caption("a photo of on the beach", "raw") == "a photo of on the beach"
    assert set(M.CLIP_T_TEXTS) == {"remove", "class", "keep"}


# --------------------------------------------------------------------------------------------- tiny CLIP / ViT


@pytest.fixture(scope="module")
def tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    from personalize.tiny import clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16,
    )
    return M.ClipScorer(CLIPModel(config), clip_tokenizer())


def test_tiny_clip_end_to_end(tiny_clip):
    images = [_noise_image(i) for i in range(3)]
    emb = tiny_clip.image_embeddings(images)
    assert emb.shape == (3, 16)
    assert emb.norm(dim=-1).tolist() == pytest.approx([1.0] * 3, abs=1e-5)
    text = tiny_clip.text_embeddings(["a photo of a dog", "a cat on the beach", "x"])
    assert text.shape == (3, 16) and text.norm(dim=-1).tolist() == pytest.approx([1.0] * 3, abs=1e-5)
    assert tiny_clip.clip_i(images[:1], images[:1]) == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= tiny_clip.clip_i(images[:2], images[2:]) <= 1.0
    raw = tiny_clip.clip_t(images, ["a photo of a dog", "a cat", "x"])
    assert -1.0 <= raw <= 1.0
    assert 0.0 <= tiny_clip.clip_t(images, ["a photo of a dog", "a cat", "x"], convention="clipscore") <= 2.5
    assert tiny_clip.provenance()["model"].startswith("in-memory")


def test_clip_and_dino_load_from_saved_folders(tiny_clip, tmp_path):
    from transformers import ViTConfig, ViTModel

    tiny_clip.model.save_pretrained(tmp_path / "clip")
    tiny_clip.tokenizer.save_pretrained(tmp_path / "clip")
    loaded = M.ClipScorer.load(tmp_path / "clip")
    images = [_noise_image(3)]
    assert torch.allclose(loaded.image_embeddings(images), tiny_clip.image_embeddings(images), atol=1e-5)
    assert torch.allclose(loaded.text_embeddings(["a dog"]), tiny_clip.text_embeddings(["a dog"]), atol=1e-5)
    assert loaded.provenance()["weights_sha256"] == M.file_sha256(tmp_path / "clip" / "model.safetensors")

    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=4, intermediate_size=64), add_pooling_layer=False)
    vit.save_pretrained(tmp_path / "dino")  # like facebook/dino-vits16: no pooler weights
    dino = M.DinoScorer.load(tmp_path / "dino")
    assert getattr(dino.model, "pooler", None) is None
    assert torch.allclose(dino.image_embeddings(images), M.DinoScorer(vit).image_embeddings(images), atol=1e-5)


def test_clip_preprocessing_matches_transformers_pil_processor():
    try:
        from transformers import CLIPImageProcessorPil
    except ImportError:
        pytest.skip("transformers without CLIPImageProcessorPil (4.x)")
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    images = [_noise_image(7, (57, 40)), _noise_image(8, (40, 71))]
    theirs = processor(images=images, return_tensors="pt")["pixel_values"]
    ours = M.preprocess_images(images, 32, M.CLIP_MEAN, M.CLIP_STD)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_dino_embedding_is_cls_token_not_pooler():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    model = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64), add_pooling_layer=True)
    scorer = M.DinoScorer(model)
    images = [_noise_image(1), _noise_image(2, (32, 48))]
    emb = scorer.image_embeddings(images)
    pixels = M.preprocess_images(images, 32, M.IMAGENET_MEAN, M.IMAGENET_STD)
    with torch.no_grad():
        out = model(pixel_values=pixels)
    cls = torch.nn.functional.normalize(out.last_hidden_state[:, 0], dim=-1)
    pooled = torch.nn.functional.normalize(out.pooler_output, dim=-1)
    assert torch.allclose(emb, cls, atol=1e-5)
    assert not torch.allclose(emb, pooled, atol=1e-2)
    assert scorer.dino(images[:1], images[:1]) == pytest.approx(1.0, abs=1e-5)
    assert M.DinoScorer(model, resize_to=36).image_embeddings(images).shape == (2, 32)  # DINO's 256/224 style


# --------------------------------------------------------------------------------------------- masks


def _two_tone(width=10, height=6) -> Image.Image:
    array = np.full((height, width, 3), 200, dtype=np.uint8)
    return Image.fromarray(array)


def test_apply_mask_fills_and_crops_to_square_box():
    image = _two_tone()
    mask = np.zeros((6, 10), dtype=bool)
    mask[1:3, 2:8] = True  # 2 rows x 6 columns of subject
    fg = M.apply_mask(image, mask, crop=False)
    arr = np.asarray(fg)
    assert fg.size == (10, 6)
    assert (arr[1:3, 2:8] == 200).all() and (arr[0] == 0).all() and (arr[:, 8:] == 0).all()
    bg = np.asarray(M.apply_mask(image, mask, keep="background", fill=(255, 0, 0), crop=True))
    assert bg.shape == (6, 10, 3)  # crop ignored for the background
    assert (bg[1:3, 2:8] == [255, 0, 0]).all() and (bg[0] == 200).all()
    cropped = M.apply_mask(image, mask, fill=(9, 9, 9))
    assert cropped.size == (6, 6)  # the square around the 6-wide box
    c = np.asarray(cropped)
    # box rows 1..2 centred in 6 rows: square rows -1..4; row -1 is outside the image -> fill
    assert (c[0] == 9).all() and (c[2:4] == 200).all() and (c[4:] == 9).all()


def test_apply_mask_pil_mask_threshold_resize_and_empty():
    image = _two_tone(8, 8)
    mask = Image.new("L", (4, 4), 0)
    mask.paste(255, (0, 0, 2, 4))  # left half, at half resolution
    out = np.asarray(M.apply_mask(image, mask, crop=False))
    assert (out[:, :4] == 200).all() and (out[:, 4:] == 0).all()
    assert (np.asarray(M.apply_mask(image, Image.new("L", (8, 8), 127), crop=False)) == 0).all()  # < 128: background
    empty = M.apply_mask(image, np.zeros((8, 8), bool))
    assert empty.size == (8, 8) and (np.asarray(empty) == 0).all()


def test_masked_similarity_ignores_background():
    def embed(images):  # mean colour: enough to see what the mask lets through
        return torch.tensor(np.stack([np.asarray(im, dtype=np.float32).reshape(-1, 3).mean(0) + 1 for im in images]))

    def scene(background):
        array = np.zeros((8, 8, 3), np.uint8)
        array[:] = background
        array[2:6, 2:6] = (255, 0, 0)
        return Image.fromarray(array)

    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    generated, reference = [scene((0, 0, 255))], [scene((0, 255, 0))]
    assert M.mean_pairwise_cosine(embed(generated), embed(reference)) < 0.9
    assert M.masked_similarity(embed, generated, [mask], reference, [mask]) == pytest.approx(1.0, abs=1e-6)
    assert M.masked_similarity(embed, generated, [mask], reference, [mask], keep="background") < 0.9
    with pytest.raises(PersonalizeError):
        M.masked_similarity(embed, generated, [], reference, [mask])


def test_toy_foreground_mask_reproduces_the_renderers_masks():
    """A toy-world image has a flat background from world.BACKGROUNDS: segmenting by it gives the renderer's mask
    (coverage >= 50 %) away from the anti-aliased rim, whatever the object's colour or pattern."""
    import random

    from personalize.evaluate.toy import foreground_mask
    from personalize.toyworld.world import Scene, random_scene, render

    flat = np.full((16, 16, 3), (250, 170, 200), np.uint8)  # pink, with a red square: exact to the pixel
    flat[4:10, 5:12] = (220, 30, 30)
    expected = np.zeros((16, 16), bool)
    expected[4:10, 5:12] = True
    assert np.array_equal(foreground_mask(Image.fromarray(flat)), expected)

    def rim(mask):  # pixels with a 4-neighbour on the other side of the outline: anti-aliased blends
        grown, shrunk = mask.copy(), mask.copy()
        for a, b in ((np.s_[1:], np.s_[:-1]), (np.s_[:-1], np.s_[1:]), (np.s_[:, 1:], np.s_[:, :-1]), (np.s_[:, :-1], np.s_[:, 1:])):
            grown[a] |= mask[b]
            shrunk[a] &= mask[b]
        return grown & ~shrunk

    image, mask = render(Scene("star", "blue", "striped", background="black", size="large", position="center"))
    found = foreground_mask(image)  # dark stripes on black stay foreground
    assert not ((found != mask) & ~rim(mask)).any() and (found != mask).sum() <= rim(mask).sum() // 4

    rng, ious = random.Random(0), []
    for _ in range(100):
        scene = random_scene(rng)
        image, mask = render(scene)
        found = foreground_mask(image)
        ious.append((found & mask).sum() / (found | mask).sum())
        if "dotted" not in (scene.pattern, scene.second and scene.second.pattern):  # white dots may touch the rim
            assert not ((found != mask) & ~rim(mask)).any(), scene
    assert np.mean(ious) > 0.97


# --------------------------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def lpips():
    torch.manual_seed(0)
    return M.LPIPS(M.AlexNetFeatures())


def test_shipped_lpips_heads_load_and_are_non_negative():
    state = torch.load(M.LPIPS_HEADS_FILE, map_location="cpu", weights_only=True)
    assert sorted(state) == [f"lin{k}.model.1.weight" for k in range(5)]
    for k, channels in enumerate(M.LPIPS.CHANNELS):
        weight = state[f"lin{k}.model.1.weight"]
        assert weight.shape == (1, channels, 1, 1) and (weight >= 0).all() and weight.sum() > 0
    assert (M.LPIPS_HEADS_FILE.parent / "LICENSE").read_text().count("Richard Zhang") == 1
    module = M.LPIPS(M.AlexNetFeatures())
    for k in range(5):
        assert torch.equal(getattr(module, f"lin{k}").model[1].weight, state[f"lin{k}.model.1.weight"])


def test_lpips_identity_symmetry_and_positive(lpips):
    x = M.images_to_tensor([_noise_image(1, (64, 64)), _noise_image(2, (64, 64))])
    y = M.images_to_tensor([_noise_image(3, (64, 64)), _noise_image(4, (64, 64))])
    assert lpips(x, x).tolist() == [0.0, 0.0]
    d_xy, d_yx = lpips(x, y), lpips(y, x)
    assert d_xy.shape == (2,) and (d_xy > 0).all()
    assert torch.allclose(d_xy, d_yx, atol=1e-6)


class _SignTrunk(torch.nn.Module):
    """Fake trunk: every tap is 1x1, along channel 0 (times 5) for a bright image and channel 1 for a dark one."""

    def forward(self, x):
        bright = (x.mean(dim=(1, 2, 3)) > 0).float()
        taps = []
        for channels in M.LPIPS.CHANNELS:
            tap = torch.zeros(len(x), channels, 1, 1)
            tap[:, 0, 0, 0], tap[:, 1, 0, 0] = 5 * bright, 1 - bright
            taps.append(tap)
        return taps


def test_lpips_formula_by_hand():
    lpips = M.LPIPS(_SignTrunk())
    white, black = torch.ones(1, 3, 8, 8), -torch.ones(1, 3, 8, 8)
    # unit-normalised taps e0 and e1: (e0 - e1)^2 = e0 + e1, so d = Σ_k w_k[0] + w_k[1]
    expected = sum(float(getattr(lpips, f"lin{k}").model[1].weight[0, :2].sum()) for k in range(5))
    assert float(lpips(white, black)) == pytest.approx(expected, rel=1e-6)
    assert float(lpips(white, white)) == pytest.approx(0.0, abs=1e-9)


def test_lpips_load_accepts_torchvision_and_bare_keys(tmp_path, lpips):
    features = lpips.net.state_dict()
    full = {**features, "classifier.1.weight": torch.zeros(1, 9216), "classifier.1.bias": torch.zeros(1)}
    torch.save(full, tmp_path / "alexnet.pth")
    torch.save({k.removeprefix("features."): v for k, v in features.items()}, tmp_path / "bare.pth")
    x = M.images_to_tensor([_noise_image(1, (64, 64))])
    y = M.images_to_tensor([_noise_image(2, (64, 64))])
    for name in ("alexnet.pth", "bare.pth"):
        loaded = M.LPIPS.load(tmp_path / name)
        assert torch.allclose(loaded(x, y), lpips(x, y))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(PersonalizeError, match="other.pth"):
        M.LPIPS.load(tmp_path / "other.pth")


def test_div_lpips(lpips):
    same = [_noise_image(5, (64, 64))] * 3
    assert M.div_lpips([same], lpips) == pytest.approx(0.0, abs=1e-9)  # float rounding leaves ~1e-14
    a, b, c = (_noise_image(i, (64, 64)) for i in (1, 2, 3))
    tensors = M.images_to_tensor([a, b, c])
    pairs = lpips(tensors[[0, 0, 1]], tensors[[1, 2, 2]])
    expected = (float(pairs.mean()) + float(lpips(tensors[:1], tensors[1:2]))) / 2  # prompt 1: 3 pairs; prompt 2: 1
    assert M.div_lpips([[a, b, c], [a, b]], lpips) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(PersonalizeError):
        M.div_lpips([[a]], lpips)


# --------------------------------------------------------------------------------------------- FID


def test_fid_of_a_set_with_itself_is_zero():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    result = M.fid(x, x)
    mu, sigma = M.feature_statistics(x)
    assert result.n_a == result.n_b == 200
    assert result.fid < 1e-6 * np.trace(sigma)


def test_frechet_distance_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    # ||mu1-mu2||² + Σ (v1 + v2 - 2 sqrt(v1 v2))  =  10 + Σ (sqrt v1 - sqrt v2)²  =  10 + 4 + 1 + 0
    assert M.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(15.0, abs=1e-9)


def test_frechet_distance_of_non_commuting_covariances_closed_form():
    """2×2 closed form: the eigenvalues of S1·S2 are real and positive, so tr((S1 S2)^½) = sqrt(tr(S1 S2) + 2 sqrt(det)).

    S1 and S2 do not commute, so the common slip tr(S1^½ S2^½) gives 4.098 instead of 4.114 and fails here."""
    s1, s2 = np.array([[2.0, 1.0], [1.0, 2.0]]), np.array([[1.0, 0.0], [0.0, 4.0]])
    trace_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))  # sqrt(10 + 2 sqrt 12)
    mu1, mu2 = np.array([0.0, 1.0]), np.array([2.0, -1.0])
    expected = 8.0 + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-9)
    wrong = 8.0 + np.trace(s1) + np.trace(s2) - 2 * np.trace(M._sqrt_psd(s1) @ M._sqrt_psd(s2))
    assert abs(wrong - expected) > 0.02  # the closed form tells the two apart


def test_frechet_distance_matches_scipy_sqrtm():
    from scipy import linalg  # a test dependency (pyproject [test]): this check must run in CI
    rng = np.random.RandomState(0)
    a, b = rng.randn(50, 8), rng.randn(50, 8) @ rng.randn(8, 8)
    mu1, s1 = M.feature_statistics(a)
    mu2, s2 = M.feature_statistics(b)
    covmean = linalg.sqrtm(s1 @ s2).real
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)


def test_inception_features_with_a_fake_network():
    seen = {}

    def fake(x):
        seen["dtype"], seen["shape"] = x.dtype, tuple(x.shape)
        return x.float().mean(dim=(2, 3))

    extractor = M.InceptionFeatures(fake, image_size=16)
    features = extractor([_noise_image(1), _noise_image(2, (20, 50))])
    assert seen == {"dtype": torch.uint8, "shape": (2, 3, 16, 16)}
    assert features.shape == (2, 3) and features.dtype == torch.float64


# --------------------------------------------------------------------------------------------- missing weights


@pytest.mark.parametrize("load", [
    lambda: M.ClipScorer.load("/nonexistent"),
    lambda: M.DinoScorer.load("/nonexistent"),
    lambda: M.LPIPS.load("/nonexistent"),
    lambda: M.InceptionFeatures("/nonexistent"),
])
def test_missing_weights_fail_fast_naming_the_path(load):
    start = time.perf_counter()
    with pytest.raises(PersonalizeError, match="/nonexistent"):
        load()
    assert time.perf_counter() - start < 1.0


def test_uncached_hub_id_and_incomplete_folder(tmp_path):
    start = time.perf_counter()
    with pytest.raises(PersonalizeError, match="not in the local Hugging Face cache"):
        M.ClipScorer.load("no-such-org-xyz/no-such-model")
    assert time.perf_counter() - start < 1.0
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PersonalizeError, match="no weights file"):
        M.DinoScorer.load(tmp_path)
    with pytest.raises(PersonalizeError, match="no config.json"):
        M.ClipScorer.load(tmp_path.parent)


def test_metric_result_and_file_sha256(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert M.file_sha256(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    result = M.MetricResult("CLIP-T", 0.3, 8, "raw", {"model": "x"})
    assert result.versions["torch"] == torch.__version__ and result.n == 8 and result.origin == {}


def test_recorded_torch_version_names_the_build_that_ran(monkeypatch):
    """A CUDA wheel's metadata says "2.14.1" where torch says "2.14.1+cu130": the figure must name the build."""
    monkeypatch.setattr(torch, "__version__", "2.14.1+cu130")
    assert M.library_versions()["torch"] == "2.14.1+cu130"
