"""SingleInsert: masks, the two stages, the fixed reference, the vector's scale, composition, encoders."""

import logging

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from conftest import EXAMPLE_IMAGES
from personalize import cli
from personalize.backbone import load_backbone
from personalize.data import load_image_folder
from personalize.errors import PersonalizeError
from personalize.methods import Batch, SingleInsert, SingleInsertConfig
from personalize.methods.singleinsert import NORM_OVER_VOCABULARY
from personalize.tiny import build_tiny_pipeline


def one_image_folder(path, name="cat", mask="ellipse", size=None, src="00.jpg"):
    path.mkdir(parents=True, exist_ok=True)
    image = Image.open(EXAMPLE_IMAGES / src)
    image.save(path / f"{name}.jpg")
    m = Image.new("L", size or image.size, 0)
    w, h = m.size
    if mask == "ellipse":
        ImageDraw.Draw(m).ellipse((w * 0.25, h * 0.25, w * 0.75, h * 0.9), fill=255)
    elif mask == "full":
        m.paste(255, (0, 0, w, h))
    if mask is not None:
        m.save(path / f"{name}.mask.png")
    return path


def train_args(images, out, *extra):
    return ["train", "--method", "singleinsert", "--images", str(images), "--class-word", "cat", "--output", str(out),
            "--stage1-steps", "2", "--stage2-steps", "2", "--batch-size", "2", "--num-validation-images", "0", *extra]


def test_masks_beside_in_a_folder_and_their_errors(tmp_path, caplog):
    images = load_image_folder(one_image_folder(tmp_path / "a"), 32, masks=True)
    mask = images[0].mask
    assert mask.shape == (1, 32, 32) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask[0, 20, 16] == 1 and mask[0, 0, 0] == 0
    folder = one_image_folder(tmp_path / "b", mask=None)
    with pytest.raises(PersonalizeError, match="no foreground mask"):
        load_image_folder(folder, 32, masks=True)
    (tmp_path / "masks").mkdir()
    Image.open(tmp_path / "a" / "cat.mask.png").save(tmp_path / "masks" / "cat.png")
    assert torch.equal(load_image_folder(folder, 32, masks=True, masks_dir=tmp_path / "masks")[0].mask, mask)
    with pytest.raises(PersonalizeError, match="whole image"):
        load_image_folder(one_image_folder(tmp_path / "c", mask="full"), 32, masks=True)
    with pytest.raises(PersonalizeError, match="nothing to learn"):
        load_image_folder(one_image_folder(tmp_path / "d", mask="empty"), 32, masks=True)
    with caplog.at_level(logging.WARNING):
        load_image_folder(one_image_folder(tmp_path / "e", size=(50, 40)), 32, masks=True)
    assert "resized to the image" in caplog.text


def make(model="tiny", **kw):
    backbone = load_backbone(model)
    backbone.freeze()
    images = torch.stack([im.pixels for im in load_image_folder(EXAMPLE_IMAGES, 32)])[:2]
    return SingleInsert(SingleInsertConfig(class_word="cat", **kw), backbone, images=images), backbone


def test_predicted_vector_has_a_multiple_of_the_vocabularys_norm_and_starts_at_the_class_word():
    method, backbone = make()
    table = backbone.text_encoders[0].get_input_embeddings().weight
    cat = table[backbone.tokenizers[0]("cat", add_special_tokens=False).input_ids[0]]
    (v,) = method.image_encoder(method.images)
    r = NORM_OVER_VOCABULARY * table.norm(dim=1).mean()  # the default: a multiple of the vocabulary's mean norm
    torch.testing.assert_close(v.norm(dim=-1), r.expand(2, 1))
    torch.testing.assert_close(v[0, 0], r * cat / cat.norm())


def test_vector_norm_sets_the_predicted_vectors_norm_and_keeps_its_direction():
    method, backbone = make()
    scaled, _ = make(vector_norm=3.0)
    (v,), (w,) = method.image_encoder(method.images), scaled.image_encoder(scaled.images)
    torch.testing.assert_close(w.norm(dim=-1), torch.full((2, 1), 3.0))
    torch.testing.assert_close(w / 3.0, v / v.norm(dim=-1, keepdim=True))
    with pytest.raises(PersonalizeError, match="--vector-norm must be positive"):
        make(vector_norm=0.0)


def test_each_row_gets_its_own_images_vector():
    method, backbone = make()
    with torch.no_grad():
        for p in method.image_encoder.heads.parameters():
            p.normal_()
    (v,) = method.image_encoder(method.images)
    assert not torch.allclose(v[0], v[1])


def _batch(method, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    masks = torch.zeros(2, 1, 16, 16)
    masks[:, :, 4:12, 4:12] = 1
    return Batch(latents, torch.tensor([0, 1]), g, None, masks)


def test_fixed_reference_is_the_base_model_and_the_official_variant_differs():
    method, backbone = make()
    with torch.no_grad():
        for p in method.lora:
            p.normal_(std=0.3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([300, 700])
    fixed = method._fixed_class_x0(x, t, 2)
    base = load_backbone("tiny")
    with torch.no_grad():
        embeds, _ = base.encode_prompt(base.tokenize(["cat", "cat"]))
        expected = base.predict_x0(x, base.unet_forward(x, t, embeds), t)
    torch.testing.assert_close(fixed, expected, atol=1e-5, rtol=1e-5)
    method.config.semantic_reference = "lora-text-encoder"
    assert not torch.allclose(method._fixed_class_x0(x, t, 2), expected, atol=1e-4)


def test_stage_one_trains_only_the_encoder_and_stage_two_adds_lora(tmp_path, monkeypatch):
    seen = []
    original = SingleInsert.loss

    def spy(self, batch, group):
        if seen:
            last_group, enc, lora = seen[-1]
            enc_changed = any(not torch.equal(p, q) for p, q in zip(self.image_encoder.parameters(), enc))
            lora_changed = any(not torch.equal(p, q) for p, q in zip(self.lora, lora))
            assert (enc_changed, lora_changed) == ((True, False) if last_group == "stage1" else (True, True)), last_group
        result = original(self, batch, group)
        seen.append((group, [p.detach().clone() for p in self.image_encoder.parameters()], [p.detach().clone() for p in self.lora]))
        return result

    monkeypatch.setattr(SingleInsert, "loss", spy)
    folder = one_image_folder(tmp_path / "img")
    assert cli.main(train_args(folder, tmp_path / "out", "--lr", "1e-2")) == 0
    assert [g for g, *_ in seen] == ["stage1", "stage1", "stage2", "stage2"]


def test_mask_reduction_divides_by_the_area():
    method, _ = make(loss_reduction="mask")
    err = torch.ones(1, 1, 4, 4)
    weight = torch.zeros(1, 1, 4, 4)
    weight[..., :2, :2] = 1
    assert method._masked(err * 3, weight).item() == pytest.approx(3.0)
    method.config.loss_reduction = "mean"
    assert method._masked(err * 3, weight).item() == pytest.approx(3.0 * 4 / 16)


def test_stage_one_lowers_the_foreground_loss():
    method, backbone = make(stage2_steps=0)
    opt = torch.optim.AdamW(method.image_encoder.parameters(), lr=1e-2)
    first = [method.loss(_batch(method, s), "stage1")[1]["fg"] for s in range(4)]
    for step in range(40):
        loss, _ = method.loss(_batch(method, step % 4), "stage1")
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        last = [method.loss(_batch(method, s), "stage1")[1]["fg"] for s in range(4)]
    assert sum(last) < sum(first)


@pytest.mark.parametrize("model", ["tiny-v", "tiny-xl"])
def test_trains_on_v_prediction_and_sdxl(tmp_path, model):
    """Both stages on a v-prediction model and on SDXL: the predicted vector left the class word at a real token's
    norm, and in plain diffusers the files load and Stage II's LoRA (UNet and every text encoder) changes the output."""
    folder = one_image_folder(tmp_path / "img")
    out = tmp_path / "out"
    assert cli.main(train_args(folder, out, "--model", model, "--lr", "1e-2")) == 0
    files = load_file(str(out / "pytorch_lora_weights.safetensors"))
    encoders = ["text_encoder", "text_encoder_2"] if model == "tiny-xl" else ["text_encoder"]
    assert {k.split(".")[0] for k in files} == {"unet", *encoders}
    for part in ("unet", *encoders):  # lora_B starts at 0: non-zero means Stage II trained this part
        assert max(v.abs().max().item() for k, v in files.items() if k.startswith(f"{part}.") and "lora_B" in k) > 1e-4, part

    embeds = load_file(str(out / "learned_embeds.safetensors"))
    vectors = [embeds["clip_l"], embeds["clip_g"]] if model == "tiny-xl" else [embeds["<concept>"]]
    base = build_tiny_pipeline(model)
    pairs = [(base.tokenizer, base.text_encoder)] + ([(base.tokenizer_2, base.text_encoder_2)] if model == "tiny-xl" else [])
    for (tokenizer, encoder), v in zip(pairs, vectors, strict=True):
        table = encoder.get_input_embeddings().weight.detach()
        class_vector = table[tokenizer("cat", add_special_tokens=False).input_ids[0]]
        r = NORM_OVER_VOCABULARY * table.norm(dim=1).mean()
        start = r * class_vector / class_vector.norm()  # where E_i starts (zero-initialised heads)
        assert v.shape == (1, table.shape[1])
        torch.testing.assert_close(v[0].norm(), r, rtol=1e-5, atol=0)
        assert (v[0] - start).abs().max() > 1e-3  # the encoder learned: the vector left the class word

    def pipeline(lora: bool):
        pipe = build_tiny_pipeline(model)
        if model == "tiny-xl":  # README, "Using the files elsewhere": one load per text encoder
            pipe.load_textual_inversion(embeds["clip_l"], token="<concept>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(embeds["clip_g"], token="<concept>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
        else:
            pipe.load_textual_inversion(str(out))
        if lora:
            pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
        return pipe

    def draw(pipe):
        with torch.no_grad():
            return torch.tensor(pipe("a photo of <concept> cat", num_inference_steps=2, output_type="np",
                                     generator=torch.Generator().manual_seed(0)).images[0])

    with_lora, without = pipeline(True), pipeline(False)
    for name in encoders:  # each text encoder's LoRA loaded and changes its output
        ids = getattr(without, name.replace("text_encoder", "tokenizer"))("a photo of cat", return_tensors="pt").input_ids
        with torch.no_grad():
            a, b = getattr(with_lora, name)(ids)[0], getattr(without, name)(ids)[0]
        assert (a - b).abs().max() > 1e-5, name
    assert (draw(with_lora) - draw(without)).abs().max().item() > 1e-3


def test_two_concepts_trained_apart_compose_in_one_prompt(tmp_path):
    a = one_image_folder(tmp_path / "a", src="00.jpg")
    b = one_image_folder(tmp_path / "b", src="03.jpg")
    assert cli.main(train_args(a, tmp_path / "A", "--token", "<a>", "--lr", "1e-2")) == 0
    assert cli.main(train_args(b, tmp_path / "B", "--token", "<b>", "--lr", "1e-2")) == 0
    out = tmp_path / "gen"
    assert cli.main(["generate", "--concept", str(tmp_path / "A"), "--concept", str(tmp_path / "B"),
                     "--lora-scale", "1", "--lora-scale", "0.5", "--prompt", "a photo of <a> cat and <b> cat",
                     "--prompt", "a side view of <a> cat", "--num-images", "1", "--steps", "2",
                     "--output", str(out)]) == 0
    assert (out / "grid.png").is_file() and len(list(out.glob("0*.png"))) == 2
    pipe = build_tiny_pipeline("tiny")  # the files load in plain diffusers too
    pipe.load_textual_inversion(str(tmp_path / "A" / "learned_embeds.safetensors"))
    pipe.load_lora_weights(str(tmp_path / "A"))
    assert "<a>" in pipe.tokenizer.get_vocab()


def test_clip_vit_encoder_from_local_weights(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    weights = tmp_path / "vit"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=32, patch_size=8)).save_pretrained(weights)
    folder = one_image_folder(tmp_path / "img")
    assert cli.main(train_args(folder, tmp_path / "out", "--encoder", "clip-vit", "--encoder-weights", str(weights))) == 0
    assert cli.main(train_args(folder, tmp_path / "out2", "--encoder", "clip-vit")) == 2


def test_class_word_must_be_one_token(tmp_path, capsys):
    folder = one_image_folder(tmp_path / "img")
    args = train_args(folder, tmp_path / "out")
    args[args.index("cat")] = "zzqxj"
    assert cli.main(args) == 2
    assert "not one token" in capsys.readouterr().err


def test_mask_command_fails_fast_without_weights_and_writes_masks_where_training_finds_them(tmp_path, capsys):
    import time

    import numpy as np

    from personalize.masking import save_mask

    folder = one_image_folder(tmp_path / "img", mask=None)
    start = time.monotonic()
    assert cli.main(["mask", "--images", str(folder), "--class-word", "cat", "--sam", "/nowhere"]) == 2
    assert "--grounding-dino is required" in capsys.readouterr().err and time.monotonic() - start < 5
    image = Image.open(folder / "cat.jpg")
    assert image.size == (128, 128)  # 4 pixels per training pixel at 32: edges on multiples of 4 stay sharp
    mask = np.zeros(image.size[::-1], dtype=bool)
    mask[8:60, 20:88] = True  # rows 8-59, columns 20-87: not symmetric, so a transposed or flipped mask shows
    written = save_mask(mask, folder / "cat.jpg")
    assert written == folder / "cat.mask.png"
    assert sorted(p.name for p in folder.iterdir()) == ["cat.jpg", "cat.mask.png"]  # no temporary file left
    assert np.array_equal(np.asarray(Image.open(written)), np.where(mask, 255, 0))  # white = the concept, exactly
    expected = torch.zeros(1, 32, 32)
    expected[0, 2:15, 5:22] = 1  # the same rectangle at 32 px
    assert torch.equal(load_image_folder(folder, 32, masks=True)[0].mask, expected)  # what training reads


def test_paper_settings_are_the_defaults(tmp_path, monkeypatch):
    """Section 4: Stage I 50 it. at lr 1e-4 with batch 16, Stage II 100 it. at lr 5e-5 with batch 4, rates unscaled."""
    import yaml

    seen = []
    original = SingleInsert.loss

    def spy(self, batch, group):
        seen.append((group, len(batch.latents)))
        if len(seen) in (1, 51):  # each stage's first step runs the real losses at the real batch size
            return original(self, batch, group)
        # The other 148 only count rows: a zero loss on the stage's parameters keeps the loop, its optimisers and
        # checkpoints exactly as they are, at a fraction of the time (the real losses at batch 16 cost ~40 s here).
        loss = sum(p.sum() for p in self.param_groups()[group]) * 0.0
        return loss, {"loss": loss.item()}

    rates = {}
    original_adamw = torch.optim.AdamW

    def adamw(groups, **kw):
        optimizer = original_adamw(groups, **kw)
        rates[len(rates)] = [g["lr"] for g in optimizer.param_groups]
        return optimizer

    monkeypatch.setattr(SingleInsert, "loss", spy)
    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    folder = one_image_folder(tmp_path / "img")
    assert cli.main(["train", "--method", "singleinsert", "--images", str(folder), "--class-word", "cat", "--output",
                     str(tmp_path / "out"), "--num-validation-images", "0", "--checkpointing-steps", "1000"]) == 0
    assert [g for g, _ in seen] == ["stage1"] * 50 + ["stage2"] * 100
    assert {n for g, n in seen if g == "stage1"} == {16} and {n for g, n in seen if g == "stage2"} == {4}
    assert rates == {0: [1e-4], 1: [5e-5]}  # stage1, stage2: the paper's rates, not × batch size
    resolved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert (resolved["stage1_batch_size"], resolved["stage2_batch_size"], resolved["scale_lr"]) == (16, 4, None)


def test_a_mirrored_row_feeds_the_mirrored_image_to_the_encoder():
    method, _ = make()
    batch = _batch(method)
    batch.flipped = torch.tensor([False, True])
    inputs = method.encoder_inputs(batch)
    torch.testing.assert_close(inputs[0], method.images[0])
    torch.testing.assert_close(inputs[1], method.images[1].flip(-1))
    assert not torch.allclose(inputs[1], method.images[1])


def test_losses_use_the_v_prediction_x0_on_v_models(monkeypatch):
    """On a v-prediction model x* = α_t·x_t − σ_t·v̂: recompute L_fg by hand from the UNet's own output."""
    method, backbone = make("tiny-v", stage2_steps=0)
    assert backbone.prediction_type == "v_prediction"
    calls = []
    original = type(backbone).unet_forward

    def record(self, noisy, timesteps, *args, **kwargs):
        out = original(self, noisy, timesteps, *args, **kwargs)
        calls.append((noisy.detach().clone(), timesteps.clone(), out.detach().clone()))
        return out

    monkeypatch.setattr(type(backbone), "unet_forward", record)
    batch = _batch(method)
    _, logs = method.loss(batch, "stage1")
    noisy, t, v = calls[0]
    b = len(batch.latents)
    alphas = backbone.noise_scheduler.alphas_cumprod[t[:b]].view(-1, 1, 1, 1)
    x_star = alphas.sqrt() * noisy[:b] - (1 - alphas).sqrt() * v[:b].float()
    by_hand = (batch.masks * (x_star - batch.latents) ** 2).mean().item()
    assert logs["fg"] == pytest.approx(by_hand, rel=1e-5)
    epsilon_reading = (noisy[:b] - (1 - alphas).sqrt() * v[:b]) / alphas.sqrt()  # the planted-bug formula
    assert (batch.masks * (epsilon_reading - batch.latents) ** 2).mean().item() != pytest.approx(by_hand, rel=1e-2)
