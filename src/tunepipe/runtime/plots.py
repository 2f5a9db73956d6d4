"""Training plots: the loss curve and the LoRA update map.

PNGs are written with the Agg backend and no timestamp metadata, so the same
training run gives the same bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PNG_METADATA = {"Software": None}
DEAD = 1e-6  # ‖ΔW‖/‖W‖ below this: the adapter learned nothing
EXPLODING = 1.0  # above this: the update is larger than the weight it adapts


def plot_loss(log_history: list[dict], path: Path, title: str) -> bool:
    """Training loss per step (raw and smoothed) and eval loss; False when nothing was logged."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    if not train and not evals:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="#1f77b4", alpha=0.4 if len(train) > 10 else 1.0, label="train loss")
        if len(train) > 10:
            ax.plot(steps, _ema(losses), color="#1f77b4", label="train loss (smoothed)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="#d62728", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", metadata=PNG_METADATA)
    plt.close(fig)
    return True


def _ema(values) -> list[float]:
    """TensorBoard's debiased exponential moving average: no lag towards the first value."""
    weight = 0.8 if len(values) < 100 else 0.95
    out, last = [], 0.0
    for i, v in enumerate(values, start=1):
        last = weight * last + (1 - weight) * v
        out.append(last / (1 - weight**i))
    return out


def plot_sweep(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """Every sweep point's training loss (smoothed when long), overlaid on one set of axes."""
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for label, points in curves.items():
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, _ema(losses) if len(points) > 10 else losses, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss" + (" (smoothed)" if any(len(p) > 10 for p in curves.values()) else ""))
    ax.set_title(f"sweep: {len(curves)} points")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", metadata=PNG_METADATA)
    plt.close(fig)


def lora_updates(peft_model) -> list[dict]:
    """Per adapted module: the effective update ΔW = scale·B·A and its size relative to W."""
    rows = []
    for name, module in peft_model.named_modules():
        if not (hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})):
            continue
        a = module.lora_A["default"].weight.detach().float().cpu()
        b = module.lora_B["default"].weight.detach().float().cpu()
        delta = module.scaling["default"] * (b @ a)
        if getattr(module, "fan_in_fan_out", False):
            delta = delta.T
        weight = module.get_base_layer().weight.detach().float().cpu()
        rows.append(
            {
                "module": name.removeprefix("base_model.model."),
                "kind": name.rsplit(".", 1)[-1],
                "layer": _layer_index(name),
                "delta_norm": float(delta.norm()),
                "weight_norm": float(weight.norm()),
                "ratio": float(delta.norm() / weight.norm().clamp_min(1e-12)),
                "delta": delta,
            }
        )
    return rows


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def plot_lora_matrix(peft_model, png: Path, summary: Path) -> dict:
    """lora_matrix.png: top, ‖ΔW‖/‖W‖ per layer × module on a log colour scale spanning this
    model's range, so a lagging or runaway layer stands out; cells below DEAD read "dead", above
    EXPLODING carry a "!", and the title counts both. Below, the ΔW heatmap of each module kind
    at the layer where it moved most. lora_matrix.json holds the numbers."""
    rows = lora_updates(peft_model)
    kinds = sorted({r["kind"] for r in rows})
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None}) or [None]
    dead = [r["module"] for r in rows if r["ratio"] < DEAD]
    exploding = [r["module"] for r in rows if r["ratio"] > EXPLODING]

    grid = np.full((len(kinds), len(layers)), np.nan)
    for r in rows:
        grid[kinds.index(r["kind"]), layers.index(r["layer"])] = math.log10(max(r["ratio"], 1e-12))

    ncols = max(len(kinds), 1)
    fig = plt.figure(figsize=(min(max(2.4 * ncols, 7), 16), 7), dpi=72)
    top = fig.add_subplot(2, 1, 1)
    # Colours span this model's own range, so a layer that lags or runs away from the others stands out.
    low, high = np.nanmin(grid), np.nanmax(grid)
    image = top.imshow(grid, aspect="auto", cmap="viridis", vmin=low, vmax=max(high, low + 1e-3))
    top.set_yticks(range(len(kinds)), kinds)
    top.set_xticks(range(len(layers)), [str(x) for x in layers])
    top.set_xlabel("layer")
    if grid.size <= 96:
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ratio = 10**value
                label = "dead" if ratio < DEAD else f"{ratio:.1e}" + (" !" if ratio > EXPLODING else "")
                top.text(
                    j, i, label, ha="center", va="center", fontsize=8, color="w" if value < (low + high) / 2 else "k"
                )
    fig.colorbar(image, ax=top, label="log10 ‖ΔW‖/‖W‖")
    top.set_title(
        f"LoRA update size ‖scale·B·A‖/‖W‖ — {len(dead)} dead (<{DEAD:g}), {len(exploding)} exploding (>{EXPLODING:g})"
    )

    for k, kind in enumerate(kinds):
        best = max((r for r in rows if r["kind"] == kind), key=lambda r: r["ratio"])
        ax = fig.add_subplot(2, ncols, ncols + k + 1)
        delta = _downsample(best["delta"])
        limit = float(np.abs(delta).max()) or 1.0
        ax.imshow(delta, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
        ax.set_title(f"ΔW {kind}, layer {best['layer']}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(png, format="png", metadata=PNG_METADATA)
    plt.close(fig)

    report = {
        "modules": [{k: v for k, v in r.items() if k != "delta"} for r in rows],
        "dead": dead,
        "exploding": exploding,
    }
    summary.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def _downsample(delta, size: int = 64) -> np.ndarray:
    """Block-average a big ΔW to at most size×size cells so the heatmap stays readable."""
    import torch

    rows, cols = delta.shape
    fr, fc = math.ceil(rows / size), math.ceil(cols / size)
    if fr > 1 or fc > 1:
        delta = torch.nn.functional.avg_pool2d(delta[None, None], (fr, fc), ceil_mode=True)[0, 0]
    return delta.numpy()


def main(argv: list[str]) -> int:
    """`python -m tunepipe.runtime.plots sweep OUT.png '{"label": "trainer_state.json", ...}'` (the runner's)."""
    if len(argv) != 3 or argv[0] != "sweep":
        print("usage: python -m tunepipe.runtime.plots sweep OUT.png CURVES_JSON")
        return 2
    curves = {}
    for label, state in json.loads(argv[2]).items():
        history = json.loads(Path(state).read_text())["log_history"]
        curves[label] = [(e["step"], e["loss"]) for e in history if "loss" in e]
    plot_sweep(curves, Path(argv[1]))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
