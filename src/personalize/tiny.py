"""Built-in tiny models: `tiny` (SD1-style, epsilon), `tiny-v` (v-prediction, like SD 2.x 768) and `tiny-xl`
(two text encoders, like SDXL).

They are random-weight pipelines built in code from the real diffusers / transformers classes, with the real CLIP
BPE tokenizer, so every code path (tokenising, concept injection, training, saving, loading back in diffusers)
is the one that runs on Stable Diffusion — only smaller. They draw noise, not pictures: they exist for tests and
smoke runs. Weights are seeded, so the same name always gives the same model.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

TINY_MODELS = ("tiny", "tiny-v", "tiny-xl")

# open_clip's BPE file (MIT licence, see assets/OPEN_CLIP_LICENSE.txt): the merges CLIP was trained with.
_BPE_FILE = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
_CLIP_VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters (the BPE works on these)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _write_clip_tokenizer_files(folder: Path) -> None:
    """Turn the BPE merges into the vocab.json / merges.txt pair transformers' CLIPTokenizer reads.

    The vocabulary order is CLIP's own: 256 byte symbols, the same with `</w>`, one entry per merge, then the two
    special tokens — 49,408 ids, identical to openai/clip-vit-large-patch14 (SD 1.x's tokenizer).
    """
    lines = gzip.open(_BPE_FILE).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == _CLIP_VOCAB_SIZE
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def cache_dir() -> Path:
    """Where files built once are kept (tokenizer files, the random real-size models): $PERSONALIZE_CACHE, else
    ~/.cache/personalize."""
    return Path(os.environ.get("PERSONALIZE_CACHE", Path.home() / ".cache" / "personalize"))


def clip_tokenizer_dir() -> Path:
    """A folder holding the real CLIP tokenizer files, built once into the user's cache (atomically)."""
    cache = cache_dir()
    folder = cache / "clip-tokenizer"
    if (folder / "tokenizer_config.json").exists():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".clip-tokenizer-"))
    _write_clip_tokenizer_files(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process won the race: theirs is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def copy_clip_vocabulary(folder: Path) -> None:
    """Put vocab.json and merges.txt into a model's tokenizer folder: transformers 4's CLIPTokenizer (what a
    model_index.json names) cannot be built from tokenizer.json alone."""
    import shutil

    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(clip_tokenizer_dir() / name, folder / name)


@lru_cache(maxsize=None)
def _tokenizer_template():
    from transformers import CLIPTokenizer

    # Built with from_pretrained(dir): CLIPTokenizer(vocab_file=...) silently makes a 2-token tokenizer in 5.x.
    return CLIPTokenizer.from_pretrained(clip_tokenizer_dir())


@lru_cache(maxsize=None)
def _backend_without_vocabulary() -> str | None:
    """The template's `tokenizers` pipeline as JSON, its BPE model emptied but for the special tokens (so that they
    keep their ids): what `clip_tokenizer` copies. None where the template has no such pipeline (transformers 4.x's
    CLIPTokenizer is pure Python), or where a copy made from it with the template's model put back would not be the
    template exactly (another `tokenizers` release): then copies are made whole."""
    from tokenizers import Tokenizer

    backend = getattr(_tokenizer_template(), "backend_tokenizer", None)
    if backend is None:
        return None
    state = json.loads(backend.to_str())
    vocab = state["model"]["vocab"]
    state["model"] = {**state["model"], "merges": [],
                      "vocab": {t["content"]: t["id"] for t in state["added_tokens"] if vocab.get(t["content"]) == t["id"]}}
    shell = json.dumps(state)
    check = Tokenizer.from_str(shell)
    check.model = backend.model
    return shell if check.to_str() == backend.to_str() else None


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A fresh copy of the real CLIP tokenizer (fresh, because adding placeholder tokens mutates it).

    Fresh in all that adding tokens changes (the added vocabulary, special tokens, settings), but sharing the template's
    BPE model (its 49,408 words and merges), which nothing changes: a whole deepcopy rebuilds that model, 0.2 s a copy,
    and the tiny models are built hundreds of times in the tests — a minute of the suite.
    """
    import copy

    from tokenizers import Tokenizer

    template = _tokenizer_template()
    memo = {}
    shell = _backend_without_vocabulary()
    if shell is not None:
        backend = Tokenizer.from_str(shell)
        backend.model = template.backend_tokenizer.model
        memo[id(template.backend_tokenizer)] = backend  # deepcopy takes this in place of copying the template's
    tok = copy.deepcopy(template, memo)
    if pad_token != tok.pad_token:  # SD 2.x / SDXL's second tokenizer pad with "!"
        tok.pad_token = pad_token
    return tok


def _text_encoder(hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=_CLIP_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act="quick_gelu",
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    )


def _unet(cross_attention_dim: int, sdxl: bool):
    from diffusers import UNet2DConditionModel

    extra = {}
    if sdxl:
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids + pooled text of text_encoder_2
            transformer_layers_per_block=(1, 1),
        )
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        **extra,
    )


def _scheduler(prediction_type: str):
    from diffusers import DDIMScheduler

    # SD's own training schedule (scaled_linear 0.00085..0.012, 1000 steps), so timesteps mean what they mean there.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_pipeline(name: str):
    """Build one of TINY_MODELS as a diffusers pipeline (random weights, seeded: same name, same weights)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose from {TINY_MODELS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name == "tiny-xl":
            pipe = StableDiffusionXLPipeline(
                vae=_vae(),
                text_encoder=_text_encoder(32),
                text_encoder_2=_text_encoder(32, projection=32),
                tokenizer=clip_tokenizer(),
                tokenizer_2=clip_tokenizer(pad_token="!"),
                unet=_unet(cross_attention_dim=64, sdxl=True),
                scheduler=_scheduler("epsilon"),
            )
        else:
            pipe = StableDiffusionPipeline(
                vae=_vae(),
                text_encoder=_text_encoder(32),
                tokenizer=clip_tokenizer(),
                unet=_unet(cross_attention_dim=32, sdxl=False),
                scheduler=_scheduler("v_prediction" if name == "tiny-v" else "epsilon"),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
    pipe.set_progress_bar_config(disable=True)
    return pipe
