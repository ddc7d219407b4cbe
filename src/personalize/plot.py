"""`personalize plot RUN`: a run's loss and learning-rate curves from its `logs.jsonl`, as a PNG (no service)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import PersonalizeError
from .export import atomic_write
from .checkpoints import LOG_FILE


def read_log(run: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """{value name: (steps, values)} of every logged number of a run folder."""
    path = Path(run) / LOG_FILE
    if not path.is_file():
        raise PersonalizeError(f"{path} does not exist: is {run} a run folder (written by personalize train)?")
    series: dict[str, tuple[list[int], list[float]]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise PersonalizeError(f"{path}:{number} is not a JSON line ({exc})") from exc
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                steps, values = series.setdefault(key, ([], []))
                steps.append(row["step"])
                values.append(float(value))
    if not series:
        raise PersonalizeError(f"{path} holds no logged values yet")
    return series


def plot_run(run: str | Path, output: str | Path | None = None, smooth: int = 20) -> Path:
    """Losses (raw and a moving average of `smooth` steps) above, learning rates below; returns the PNG's path."""
    try:
        import matplotlib
    except ImportError as exc:
        raise PersonalizeError("personalize plot needs matplotlib: pip install 'personalize[plot]' (or matplotlib)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_log(run)
    losses = {k: v for k, v in series.items() if not k.startswith("lr/")}
    rates = {k: v for k, v in series.items() if k.startswith("lr/")}
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(2, 1))
    for name, (steps, values) in losses.items():
        line, = top.plot(steps, values, alpha=0.3, linewidth=0.8)
        if len(values) >= smooth > 1:
            averaged = [sum(values[i - smooth + 1:i + 1]) / smooth for i in range(smooth - 1, len(values))]
            top.plot(steps[smooth - 1:], averaged, color=line.get_color(), label=f"{name} (mean of {smooth})")
        else:
            line.set_label(name)
    top.set_ylabel("loss")
    top.legend(fontsize=8)
    for name, (steps, values) in rates.items():
        bottom.plot(steps, values, label=name.removeprefix("lr/"))
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("step")
    if rates:
        bottom.legend(fontsize=8)
    top.set_title(f"{Path(run).resolve().name}")
    figure.tight_layout()
    target = Path(output) if output else Path(run) / "curves.png"
    atomic_write(target, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)
    return target
