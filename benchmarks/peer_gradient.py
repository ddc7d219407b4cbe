"""One BaTex update, ours against the BaTex paper's own code: the same batch gives the same loss and the same dL/dw.

Two halves, each in its own stack, meeting through one file:

    python benchmarks/peer_gradient.py ours /tmp/batch.pt              # our venv: a fixed batch and our dL/dw
    PEERS/venv-batex/bin/python benchmarks/peer_gradient.py batex-official /tmp/batch.pt \
        --source PEERS/BaTex/batex/textual_inversion_regression.py     # its venv (transformers 4.27, diffusers 0.17)

The batch: 4 rows on the toy model (latents z = mean + std·ε of 4 random images, noise, timesteps drawn from one
seeded generator), prompt "a <concept>", init word "heart", M = 96 by dot product. Ours runs its trainer's path
(Batex's SubspaceVectors through ConceptEmbedding, `losses.denoise`, `losses.diffusion_loss`). The peer half
imports `WeightVector` from the peer's own, unmodified file (its forward builds the CLIP text path by hand) and runs
what its training loop runs at batch 1 × 4 gradient-accumulation steps: four forwards of one row, each loss divided
by 4 (accelerate's `backward`). It builds the basis as its script does (top-M of `token_embeds[:-1] @ u`) and prints
the two losses, the largest difference of the gradients on w, and whether the token ids and the bases agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

TOY_MODEL = Path(__file__).resolve().parents[1] / "src" / "personalize" / "toyworld" / "weights" / "base"
TOKEN, INIT_WORD, BASIS, ROWS = "<concept>", "heart", 96, 4


def ours(out: Path) -> dict:
    from personalize.backbone import load_backbone
    from personalize.losses import denoise, diffusion_loss
    from personalize.methods.batex import Batex, BatexConfig

    backbone = load_backbone("toy")
    method = Batex(BatexConfig(token=TOKEN, init_word=INIT_WORD, basis_size=BASIS, distance="dot"), backbone)
    source = method.sources[0][0]
    generator = torch.Generator().manual_seed(1)
    mean, std = backbone.encode_images(torch.rand(ROWS, 3, 64, 64, generator=generator) * 2 - 1)
    latents = mean + std * torch.randn(mean.shape, generator=generator)
    ids = backbone.tokenize([f"a {TOKEN}"] * ROWS)
    step = denoise(backbone, latents, ids, generator)  # the trainer's own step: noise, timesteps, prompt, UNet
    loss = diffusion_loss(step)
    loss.backward()
    torch.save({"latents": latents, "noise": step.noise, "timesteps": step.timesteps, "ids": ids[0], "loss": loss.item(),
                "grad": source.w.grad.detach().flatten(), "basis_ids": source.basis_ids.flatten()}, out)
    return {"loss": loss.item(), "grad_norm": source.w.grad.norm().item()}


def batex_official(out: Path, source: Path, model: Path) -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    argv, path = sys.argv, list(sys.path)
    sys.argv, sys.path[:0] = [argv[0]], [str(source.parent)]  # its module parses no arguments at import: keep ours away
    try:
        official = __import__(source.stem)
    finally:
        sys.argv, sys.path[:] = argv, path
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    tokenizer.add_tokens(TOKEN)  # as its main() does: add the token, resize, basis from the old rows, copy u
    placeholder, init = tokenizer.convert_tokens_to_ids(TOKEN), tokenizer.encode(INIT_WORD, add_special_tokens=False)[0]
    text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings().weight.data
    _, vocab_ids = torch.topk(torch.mm(table[:-1], table[init].unsqueeze(1)).squeeze(1), BASIS, 0, True)
    candidates = table[vocab_ids]
    table[placeholder] = table[init]
    text_encoder.requires_grad_(False), unet.requires_grad_(False)
    text_encoder.train(), unet.train()
    weights = official.WeightVector(types.SimpleNamespace(mask_k=BASIS))
    batch = torch.load(out)
    ids = tokenizer([f"a {TOKEN}"] * ROWS, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    noisy = scheduler.add_noise(batch["latents"], batch["noise"], batch["timesteps"])
    total = 0.0
    for row in range(ROWS):  # batch 1 × ROWS accumulation steps, each loss / ROWS
        hidden = weights(text_encoder, ids[row:row + 1], candidates, placeholder)[0]
        prediction = unet(noisy[row:row + 1], batch["timesteps"][row:row + 1], hidden).sample
        loss = F.mse_loss(prediction.float(), batch["noise"][row:row + 1].float(), reduction="mean") / ROWS
        loss.backward()
        total += loss.item()
    grad = weights.weight.grad.flatten()
    return {"same_token_ids": torch.equal(ids, batch["ids"]), "same_basis": torch.equal(vocab_ids, batch["basis_ids"]),
            "loss_ours": batch["loss"], "loss_theirs": total, "grad_norm_ours": batch["grad"].norm().item(),
            "grad_norm_theirs": grad.norm().item(), "grad_max_abs_difference": (grad - batch["grad"]).abs().max().item()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("side", choices=["ours", "batex-official"])
    parser.add_argument("batch", type=Path, help="the file the two halves share (ours writes it, the peer reads it)")
    parser.add_argument("--source", type=Path, help="batex-official: the peer's textual_inversion_regression.py")
    parser.add_argument("--model", type=Path, default=TOY_MODEL, help="batex-official: the toy model's folder")
    args = parser.parse_args(argv)
    if args.side == "batex-official" and not args.source:
        parser.error("batex-official needs --source PATH/textual_inversion_regression.py")
    result = ours(args.batch) if args.side == "ours" else batex_official(args.batch, args.source, args.model)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
