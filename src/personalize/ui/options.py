"""The training form's options, read from the same dataclasses that build `personalize train`'s flags.

Nothing here lists an option: `options_for(method)` walks TrainConfig and the method's config dataclass exactly as
`cli.add_dataclass_flags` does (same order, same "first class wins" rule for shared names, same flag spelling), so a
field added to a dataclass appears in the UI with its help and default, and one removed disappears. The form's
values become an argv for `personalize train`, and `check_argv` parses that argv back with the CLI's own
`build_configs` and insists it means what the form shows: the command the UI shows is the command it runs.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import MISSING, dataclass, fields

from ..configs import _base_type, build_configs, preset_description, preset_names, read_preset
from ..errors import PersonalizeError

# Fields the form has widgets of its own for (images, output, the method and model pickers, the stop/resume buttons).
OWN_WIDGETS = ("method", "model", "images", "output", "resume", "overwrite")
# Loop options shown up front; every other TrainConfig field is under "All loop options". Layout, not a list of
# options: the fields themselves, their types, defaults and help come from TrainConfig.
# How the abbreviations in field names read on the page (a label is the field's name in words).
_WORDS = {"lr": "learning rate", "num": "number of", "snr": "SNR", "ema": "EMA", "lora": "LoRA", "clip": "CLIP", "vit": "ViT",
          "fg": "foreground", "bg": "background", "sm": "L_sm", "stage1": "stage I", "stage2": "stage II"}
UP_FRONT = ("steps", "lr", "batch_size", "resolution", "seed", "validation_steps", "checkpointing_steps")


@dataclass(frozen=True)
class Option:
    """One dataclass field as a form widget: what `add_dataclass_flags` makes of it as a flag."""

    name: str
    kind: type  # int, float, str or bool (the element type of a list)
    is_list: bool
    default: object
    help: str
    choices: tuple | None
    owner: str  # the dataclass that declares it: "TrainConfig" or the method's config class
    method_default: str | None = None  # left alone, the option is this attribute of the method class (--flip: `flips`)

    @property
    def flag(self) -> str:
        return f"--{self.name.replace('_', '-')}"

    @property
    def label(self) -> str:
        """What the field is called on the page: its name in words ("init word"); the flag is in its help line."""
        words = " ".join(_WORDS.get(w, w) for w in self.name.split("_"))
        return words[0].upper() + words[1:]

    @property
    def up_front(self) -> bool:
        return self.owner != "TrainConfig" or self.name in UP_FRONT


def _default(f):
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def dataclass_options(cls, seen: set[str] | None = None) -> list[Option]:
    """`cls`'s fields as Options, skipping names in `seen` (and adding its own), as add_dataclass_flags does."""
    seen = set() if seen is None else seen
    out = []
    for f in fields(cls):
        if f.name in seen:
            continue
        seen.add(f.name)
        kind, is_list = _base_type(f.type)
        choices = f.metadata.get("choices")
        out.append(Option(f.name, kind, is_list, _default(f), f.metadata.get("help", ""),
                          tuple(choices) if choices else None, cls.__name__, f.metadata.get("method_default")))
    return out


def options_for(method: str) -> list[Option]:
    """The options of `personalize train --method METHOD` that the form shows as fields."""
    from ..methods import METHODS
    from ..trainer import TrainConfig

    if method not in METHODS:
        raise PersonalizeError(f"unknown method {method!r}; choose from {', '.join(sorted(METHODS))}")
    seen: set[str] = set()
    every = dataclass_options(TrainConfig, seen) + dataclass_options(METHODS[method].config_class, seen)
    return [o for o in every if o.name not in OWN_WIDGETS]


def presets() -> dict[str, str]:
    """{preset name: its one-line description}, as `personalize presets` prints them."""
    return {name: preset_description(name) for name in preset_names()}


def left_alone(option: Option, method: str):
    """What `option` is when no flag sets it: the method's own default where the field defers to the method (as the
    trainer resolves it), else the dataclass default."""
    from ..methods import METHODS

    return getattr(METHODS[method], option.method_default) if option.method_default else option.default


def baseline(method: str, preset: str | None) -> dict:
    """What each option is when the form leaves it alone: the dataclass default (or, where the field defers to the
    method, the method's: the switch of --flip shows what the run will do), or the preset's value."""
    values = {o.name: left_alone(o, method) for o in options_for(method)}
    if preset:
        values.update({k: v for k, v in read_preset(preset).items() if k in values})
    return values


PREVIEWS_DURING_TRAINING = 5  # the UI's default --validation-steps: steps / 5


def with_ui_defaults(method: str, preset: str | None, values: dict) -> dict:
    """The form's values with the UI's one default of its own: previews while it trains, about five of them (the
    CLI's default draws one, at the end: a user watching the page would see nothing until then)."""
    from ..methods import METHODS

    base = baseline(method, preset)
    if values.get("validation_steps") is not None or base.get("validation_steps") is not None:
        return dict(values)
    steps = values.get("steps") or base.get("steps") or METHODS[method].default_steps
    return {**values, "validation_steps": max(1, steps // PREVIEWS_DURING_TRAINING)}


def flag_tokens(option: Option, value) -> list[str]:
    """The argv tokens that set `option` to `value` (BooleanOptionalAction for bools, nargs='+' for lists)."""
    if option.kind is bool:
        return [option.flag if value else f"--no-{option.flag[2:]}"]
    if option.is_list:
        return [option.flag, *(str(v) for v in value)]
    return [option.flag, str(value)]


def parse_value(option: Option, raw):
    """A widget's raw value -> the option's value; None when the field is left empty (the baseline then applies)."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if option.kind is bool:
        return bool(raw)
    if option.is_list:
        items = raw if isinstance(raw, list) else [line.strip() for line in str(raw).splitlines()]
        return [option.kind(v) for v in items if str(v).strip()] or None
    try:
        value = option.kind(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        raise PersonalizeError(f"{option.flag}: {raw!r} is not a{'n' if option.kind is int else ''} "
                               f"{option.kind.__name__}") from None
    if option.kind is int and isinstance(raw, float) and raw != int(raw):
        raise PersonalizeError(f"{option.flag}: {raw} is not a whole number")
    if option.choices and value not in option.choices:
        raise PersonalizeError(f"{option.flag}: {value!r} is not one of {', '.join(map(str, option.choices))}")
    return value


def train_argv(method: str, model: str, images: str, output: str, values: dict, preset: str | None = None) -> list[str]:
    """`personalize train` argv (without the program name) for the form's state: the method, model, images and
    output always, the preset when one is picked, and a flag for every option whose value differs from its baseline."""
    argv = ["train", "--method", method]
    if preset:
        argv += ["--preset", preset]
    argv += ["--model", model]
    if not values.get("dataset"):  # a --dataset file names its own image folders (the trainer refuses both)
        argv += ["--images", images]
    argv += ["--output", output]
    base = baseline(method, preset)
    for option in options_for(method):
        value = values.get(option.name)
        if value is None or value == base[option.name]:
            continue
        argv += flag_tokens(option, value)
    return argv


def parse_quietly(argv: list[str]):
    """`build_configs(argv)`, with argparse's refusal as a PersonalizeError in its own words (argparse would print
    its usage to the server's terminal and exit)."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            return build_configs(argv)
    except SystemExit as exc:
        errors = [line.split("error: ", 1)[1] for line in said.getvalue().splitlines() if "error: " in line]
        raise PersonalizeError(errors[-1] if errors else f"personalize train refuses {' '.join(argv)}") from exc


def check_argv(argv: list[str], method: str, values: dict):
    """Parse `argv` with the CLI's own parser and require every value the form shows: the command is the form.
    Returns the parsed (TrainConfig, method config)."""
    train_cfg, method_cfg = parse_quietly(argv[1:])
    parsed = {**vars(train_cfg), **vars(method_cfg)}
    if parsed["method"] != method:
        raise PersonalizeError(f"the command trains {parsed['method']}, the form says {method}")
    for option in options_for(method):
        wanted, meant = values.get(option.name), parsed.get(option.name)
        if meant is None:  # no flag: what the run will use
            meant = left_alone(option, method)
        if wanted is not None and meant != wanted:
            raise PersonalizeError(f"{option.flag}: the command would mean {meant!r}, the form says {wanted!r}")
    return train_cfg, method_cfg


def option_named_in(message: str, options: list[Option]) -> Option | None:
    """The option an error message is about (the first of its flags it names), to show the message beside it."""
    for flag in re.findall(r"--[a-z][a-z0-9-]*", message):
        for option in options:
            if flag in (option.flag, f"--no-{option.flag[2:]}"):
                return option
    return None


_DEFAULT_NOTE = re.compile(r"\s*\(default: [^()]*(\([^()]*\)[^()]*)*\)$")


def help_line(option: Option, base) -> str:
    """The field's flag, its help and what it is when left alone: once (a help that says its own default keeps it
    only while the form does not know better, e.g. "(default: the method's)" until a preset gives a number)."""
    if base is None:
        return f"{option.flag} · {option.help}"
    shown = base if base != "" else "''"
    note = "" if base == option.default else ", the method's" if option.method_default else ", from the preset"
    return f"{option.flag} · {_DEFAULT_NOTE.sub('', option.help)} (default: {shown}{note})"
