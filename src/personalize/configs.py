"""Run options, shared by the CLI and the web UI: flags built from the config dataclasses (TrainConfig and the
chosen method's), presets, `--config` files, and `build_configs` that resolves them.

Every option is documented once, where it is declared. Precedence: dataclass default < `--preset` < `--config FILE`
(YAML or TOML) < command line. Neither the CLI nor the UI owns this: both import it, and it imports neither.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from .errors import PersonalizeError


# -- flags from dataclasses -------------------------------------------------------------------------------------


def _base_type(annotation) -> tuple[type, bool]:
    """(element type, is_list) of a field annotation such as `int | None` or `list[str] | None`."""
    hint = eval(annotation, {"list": list}) if isinstance(annotation, str) else annotation  # noqa: S307 - our own annotations
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    hint = args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, seen: set[str]) -> None:
    group = parser.add_argument_group(cls.__name__)
    for f in fields(cls):
        if f.name in seen:
            continue
        seen.add(f.name)
        kind, is_list = _base_type(f.type)
        names = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            names.append(f"--{f.name}")
        names += f.metadata.get("aliases", [])
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else None)
        help_text = f.metadata.get("help", "")
        if "(default:" not in help_text:  # a help that says its own default ("the method's") is not followed by "None"
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        kwargs = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            parser_action = argparse.BooleanOptionalAction
            group.add_argument(*names, action=parser_action, **kwargs)
            continue
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        group.add_argument(*names, type=kind, nargs="+" if is_list else None, **kwargs)


def read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise PersonalizeError(f"--config {p}: no such file")
    try:
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(p.read_text())
        else:
            import yaml

            data = yaml.safe_load(p.read_text()) or {}
    except Exception as exc:  # noqa: BLE001 - YAML and TOML raise their own error types
        raise PersonalizeError(f"--config {p} is not valid YAML/TOML: {exc}") from exc
    if not isinstance(data, dict):
        raise PersonalizeError(f"--config {p} must hold a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


PRESETS_DIR = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def read_preset(name: str) -> dict:
    """A preset: one YAML file of option defaults in the package (its first comment line says what it is for)."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise PersonalizeError(f"unknown --preset {name!r}; `personalize presets` lists them: {', '.join(preset_names())}")
    return read_config_file(str(path))


def preset_description(name: str) -> str:
    first = (PRESETS_DIR / f"{name}.yaml").read_text().splitlines()[0]
    return first.lstrip("# ").strip()


def build_configs(argv: list[str]):
    """Parse `train` flags into (TrainConfig, method config). Precedence: the dataclasses' defaults < --preset <
    --config FILE < the command line."""
    from .methods import METHODS
    from .trainer import TrainConfig

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default=None)
    pre.add_argument("--config", default=None)
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(argv)
    preset_values = read_preset(known.preset) if known.preset else {}
    file_values = {**preset_values, **(read_config_file(known.config) if known.config else {})}
    method = known.method or file_values.get("method") or TrainConfig.method
    if method not in METHODS:
        raise PersonalizeError(f"unknown --method {method!r}; choose from {', '.join(sorted(METHODS))}")
    method_cls = METHODS[method].config_class

    parser = argparse.ArgumentParser(prog="personalize train", description="Train a concept from a folder of images.")
    parser.add_argument("--config", help="YAML/TOML file with any of these options (the command line wins)")
    parser.add_argument("--preset", help=f"named defaults ({', '.join(preset_names())}; `personalize presets` shows them); "
                                         "--config and the command line win")
    seen: set[str] = set()
    add_dataclass_flags(parser, TrainConfig, seen)
    add_dataclass_flags(parser, method_cls, seen)
    args = vars(parser.parse_args(argv))
    args.pop("config", None)
    args.pop("preset", None)
    unknown = set(file_values) - seen - {"personalize"}
    if unknown:
        where = f"--config {known.config}" if known.config else f"--preset {known.preset}"
        raise PersonalizeError(f"{where}: unknown option(s) {', '.join(sorted(unknown))} for --method {method}")
    values = {**{k: v for k, v in file_values.items() if k in seen}, **args, "method": method}
    train_cfg = TrainConfig(**{f.name: values[f.name] for f in fields(TrainConfig) if f.name in values})
    method_cfg = method_cls(**{f.name: values[f.name] for f in fields(method_cls) if f.name in values})
    return train_cfg, method_cfg
