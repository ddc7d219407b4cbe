"""LoRA on the UNet (and text encoders) through peft, and its files: diffusers/PEFT and kohya.

Adapters are added with diffusers' own `add_adapter` (peft underneath), so the trained modules are exactly what
`load_lora_weights` rebuilds. Files:
- `pytorch_lora_weights.safetensors` — diffusers/PEFT keys (`unet.…lora_A.weight`), written by the pipeline's own
  `save_lora_weights` with `lora_adapter_metadata`, loads with `pipe.load_lora_weights`. Written to load on every
  stack pyproject.toml declares (CI's oldest leg loads it there): the metadata holds only the basic LoraConfig
  fields (diffusers calls `LoraConfig(**metadata)`, which an older peft refuses on any field it does not know), and
  text-encoder keys keep the `text_model.` level (`text_encoder.text_model.encoder.layers.0.self_attn.q_proj…`),
  the layout diffusers documents: transformers 4.x needs it, diffusers drops it for 5.x's flatter CLIP;
- `<name>.kohya.safetensors` — kohya keys (`lora_unet_<module path with _>.lora_down.weight / lora_up.weight /
  alpha`, `lora_te_` / `lora_te1_` / `lora_te2_` for text encoders), the naming A1111, ComfyUI and diffusers read,
  with the `ss_*` metadata kohya's trainer writes (A1111 sorts a LoRA into SD1/SD2/SDXL by it). `<name>` is the
  run's (`export.run_name`), not its token: A1111 (`<lora:<name>.kohya:1>`) and ComfyUI call a LoRA by its file
  name in one shared folder, where two runs' `sks.kohya.safetensors` would overwrite each other.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import PersonalizeError
from .export import atomic_write, save_safetensors

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_SUFFIX = ".kohya.safetensors"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


# How the down matrix A starts (B starts at zero either way, so every adapter starts as the base model):
# "gaussian" is N(0, 1/r), what diffusers' LoRA scripts ask peft for; "kaiming" is Kaiming-uniform with a = √5,
# i.e. U(±1/√fan_in), peft's own default and kohya's networks.lora. At rank 4 on a 320-wide layer A's entries are
# about 8× smaller under "kaiming" (5× on the toy model's 128-wide ones), and so is every early update of B·A.
LORA_INITS = {"gaussian": "gaussian", "kaiming": True}


def lora_config(rank: int, alpha: float | None, targets, init: str = "gaussian") -> "LoraConfig":
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=LORA_INITS[init], target_modules=list(targets))


def add_lora(model, name: str, rank: int, alpha: float | None, targets, init: str = "gaussian") -> list[torch.nn.Parameter]:
    """Add adapter `name` to a diffusers / transformers model; return its (fp32, trainable) parameters."""
    import warnings

    from peft import inject_adapter_in_model

    config = lora_config(rank, alpha, targets, init)
    with warnings.catch_warnings():  # a second adapter is intended (Dis²Booth), peft warns about it
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        if hasattr(model, "peft_config") or not _is_transformers_model(model):
            model.add_adapter(config, adapter_name=name)  # diffusers models (peft's own integration)
        else:
            # transformers' add_adapter demands a newer peft than exists for some releases (5.24 wants 0.22);
            # peft's own injection is what it calls underneath.
            inject_adapter_in_model(config, model, adapter_name=name)
            model.peft_config = {name: config}
    params = [p for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n]
    if not params:
        raise PersonalizeError(f"no module of {type(model).__name__} matches the LoRA targets {list(targets)}")
    for p in params:
        p.data = p.data.float()  # trainable weights stay fp32 under mixed precision
        p.requires_grad_(True)
    return params


def _is_transformers_model(model) -> bool:
    return type(model).__module__.startswith("transformers.")


def adapter_state(model, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s weights with peft's adapter-free keys (`…to_q.lora_A.weight`)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


def set_adapter_state(model, name: str, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, state, adapter_name=name)


def scaling(model, name: str) -> float:
    config = model.peft_config[name]
    return config.lora_alpha / config.r


# -- files -----------------------------------------------------------------------------------------------------


# LoraConfig fields that peft has had since our oldest declared version and that decide what an adapter computes;
# the rest of `to_dict()` (peft 0.21 adds alora_invocation_tokens, arrow_config, ...) would stop an older peft.
BASIC_CONFIG_FIELDS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "lora_dropout", "bias",
                       "use_rslora", "use_dora")


def basic_config(config: dict) -> dict:
    """The portable part of a LoraConfig dict."""
    return {k: config[k] for k in BASIC_CONFIG_FIELDS if k in config}


def documented_key(component: str, key: str) -> str:
    """A peft key as diffusers documents it: text-encoder modules under `text_model.` (transformers 5.x's CLIP has
    no such level; 4.x's has, and diffusers strips it again where the model lacks it)."""
    if component.startswith("text_encoder") and not key.startswith("text_model."):
        return "text_model." + key
    return key


def save_diffusers_lora(pipeline_cls, output_dir: Path, layers: dict[str, dict], metadata: dict[str, dict]) -> Path:
    """Write diffusers' LoRA file via the pipeline class's own writer, atomically.

    `layers`/`metadata` map a component ('unet', 'text_encoder', 'text_encoder_2') to its peft state dict and its
    LoraConfig dict (only its `BASIC_CONFIG_FIELDS` are written).
    """
    output_dir = Path(output_dir)
    layers = {c: {documented_key(c, k): v for k, v in state.items()} for c, state in layers.items()}
    kwargs = {f"{component}_lora_layers": state for component, state in layers.items()}
    kwargs.update({f"{component}_lora_adapter_metadata": basic_config(meta) for component, meta in metadata.items()})

    def write(tmp: Path) -> None:
        pipeline_cls.save_lora_weights(str(tmp.parent), weight_name=tmp.name, safe_serialization=True, **kwargs)

    path = atomic_write(output_dir / LORA_FILE, write)
    loaded = load_file(str(path))
    expected = {f"{c}.{k}" for c, state in layers.items() for k in state}
    if set(loaded) != expected:
        raise PersonalizeError(f"{path} did not read back with the expected keys")
    return path


KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}


def to_kohya(layers: dict[str, dict], alphas: dict[str, float], sdxl: bool) -> dict[str, torch.Tensor]:
    """peft keys -> kohya keys: module path with '_' instead of '.', lora_down/lora_up, one alpha per module."""
    out = {}
    for component, state in layers.items():
        prefix = "lora_te1" if sdxl and component == "text_encoder" else KOHYA_PREFIX[component]
        for key, value in state.items():
            match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
            if match is None:
                continue
            module, which = match.groups()
            name = f"{prefix}_{documented_key(component, module).replace('.', '_')}"  # kohya names keep text_model
            out[f"{name}.lora_{'down' if which == 'A' else 'up'}.weight"] = value
            out[f"{name}.alpha"] = torch.tensor(float(alphas[component]))
    return out


# kohya's names for the base model (its model_util / sdxl_model_util); a v-prediction SD 1/2 model gets "_v" appended.
KOHYA_BASE_MODEL = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def kohya_metadata(backbone, configs: dict[str, dict], alphas: dict[str, float], *, step: int, resolution: int) -> dict[str, str]:
    """The `ss_*` fields kohya's train_network writes (as strings, its spelling of booleans and tuples).

    A1111 files a LoRA by them: `ss_base_model_version` 'sdxl_…' is SDXL, `ss_v2` 'True' SD 2.x, anything else
    SD 1.x, and its Lora tab hides a LoRA filed under another version than the loaded model's.
    `configs`/`alphas` are per component ('unet', 'text_encoder', ...) as `save_lora_files` gets them.
    """
    version, v_pred = backbone.sd_version, backbone.prediction_type == "v_prediction"
    main = "unet" if "unet" in configs else next(iter(configs))
    targets = {f"{c}_target_modules": _module_list(cfg.get("target_modules")) for c, cfg in configs.items()}
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(configs[main]["r"]),
        "ss_network_alpha": str(float(alphas[main])),
        "ss_network_args": json.dumps(targets),  # kohya's free-form network options: here, what carries LoRA
        "ss_network_train_unet_only": str(set(configs) == {"unet"}),
        "ss_base_model_version": KOHYA_BASE_MODEL[version] + ("_v" if v_pred and version != "sdxl" else ""),
        "ss_v2": str(version == "sd2"),
        "ss_v_parameterization": str(v_pred),
        "ss_resolution": str((resolution, resolution)),
        "ss_sd_model_name": backbone.name,
        "ss_steps": str(step),
    }


def _module_list(targets) -> str:
    return targets if isinstance(targets, str) else ",".join(sorted(targets or ()))


def save_kohya_lora(output_dir: Path, name: str, layers: dict[str, dict], alphas: dict[str, float], sdxl: bool,
                    meta: dict) -> Path:
    """Write `<name>.kohya.safetensors`; `ss_output_name` is `name`, as kohya's trainer records its output's name."""
    tensors = to_kohya(layers, alphas, sdxl)
    meta = {**meta, "ss_output_name": name}
    return save_safetensors(Path(output_dir) / f"{name}{KOHYA_SUFFIX}", tensors, {k: str(v) for k, v in meta.items()})
