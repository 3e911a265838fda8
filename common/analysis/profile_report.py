"""The profile report: where the outliers are, as tables and plots.

Per decoder layer, for the q_proj input (the residual stream after the norm, which a
residual rotation flattens) and the down_proj input (inside the MLP, which it does not):
abs-max, abs-p99.9 and their ratio (mllm's clip rule compares the ratio with T). The plots
are written with fixed metadata so the same profile gives the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from common.analysis.quant_plan import layer_index
from common.core.records import write_bytes_atomic, write_json_atomic
from common.core.resources import resources_line

PLOTTED_ROLES = ("q", "down")
HEATMAP_ROLES = ("q", "o", "gate", "down")
#: A fused projection reads the same tensor as the role it stands for (Qwen1's ``qkv``: the
#: normed residual stream that q reads), so it fills that role's columns.
_READS_LIKE = {"qkv": "q"}


def _role(st: dict[str, Any]) -> str:
    return _READS_LIKE.get(st["role"], st["role"])


def layer_table(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per decoder layer: abs-max, abs-p99.9 and ratio of each plotted input."""
    rows: dict[int, dict[str, Any]] = {}
    for name, st in stats.items():
        index = layer_index(name)
        if index is None or _role(st) not in PLOTTED_ROLES:
            continue
        row = rows.setdefault(index, {"layer": index})
        absmax, p999 = st["input"]["absmax"], st["input"]["abs_p999"]
        row[f"{_role(st)}_input_absmax"] = absmax
        row[f"{_role(st)}_input_abs_p999"] = p999
        row[f"{_role(st)}_input_ratio"] = absmax / max(p999, 1e-12)
    return [rows[i] for i in sorted(rows)]


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=100, metadata={"Software": None})


def _plots(
    out_dir: Path, rows: list[dict[str, Any]], heat: dict[str, torch.Tensor], chosen: int
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in rows]
    files = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, role in zip(axes, PLOTTED_ROLES, strict=True):
        ax.semilogy(layers, [r[f"{role}_input_absmax"] for r in rows], "o-", label="abs-max")
        ax.semilogy(layers, [r[f"{role}_input_abs_p999"] for r in rows], "s-", label="abs p99.9")
        ax.set(title=f"{role}_proj input", xlabel="layer")
        ax.legend()
    fig.tight_layout()
    _save(fig, out_dir / "input_ranges.png")
    plt.close(fig)
    files.append("input_ranges.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for role in PLOTTED_ROLES:
        ax.semilogy(
            layers, [r[f"{role}_input_ratio"] for r in rows], "o-", label=f"{role}_proj input"
        )
    ax.set(title="outlier ratio abs-max / abs-p99.9", xlabel="layer")
    ax.legend()
    fig.tight_layout()
    _save(fig, out_dir / "outlier_ratio.png")
    plt.close(fig)
    files.append("outlier_ratio.png")

    width = max(t.numel() for t in heat.values())
    grid = torch.full((len(heat), width), float("nan"))
    for i, t in enumerate(heat.values()):
        grid[i, : t.numel()] = t.clamp(min=1e-6).log10()
    fig, ax = plt.subplots(figsize=(11, 2.5))
    image = ax.imshow(grid.numpy(), aspect="auto", interpolation="nearest", cmap="magma")
    ax.set_yticks(range(len(heat)), [f"{role}_proj in" for role in heat])
    ax.set(
        title=f"layer {chosen}: log10 per-channel abs-max of the linear inputs", xlabel="channel"
    )
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    _save(fig, out_dir / "channel_heatmap.png")
    plt.close(fig)
    files.append("channel_heatmap.png")
    return files


def write_report(
    out_dir: Path,
    doc: dict[str, Any],
    channel_absmax: dict[str, torch.Tensor],
    resources: dict[str, Any],
) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and the plots into ``out_dir``; ``resources``
    is the step's :meth:`~common.steps.phases.Run.resources` record."""
    ext = doc["edgeforge"]
    stats = ext["stats"]
    rows = layer_table(stats)
    chosen = max(rows, key=lambda r: r.get("down_input_ratio", 0.0))["layer"] if rows else None
    heat = {}
    if chosen is not None:
        for name, st in stats.items():
            if layer_index(name) == chosen and _role(st) in HEATMAP_ROLES and _role(st) not in heat:
                heat[_role(st)] = channel_absmax[f"{name}.input"]
    plots = _plots(out_dir, rows, heat, chosen) if rows else []
    worst = sorted(rows, key=lambda r: -r.get("down_input_ratio", 0.0))[:5]
    report = {
        "model": ext["model"],
        "tokens": ext["tokens"],
        "transforms": ext["transforms"],
        "layers": rows,
        "worst_down_input_layers": [r["layer"] for r in worst],
        "heatmap_layer": chosen,
        "plots": plots,
        "resources": resources,
    }
    write_json_atomic(out_dir / "report.json", report)
    lines = [
        f"# Activation profile: {ext['model']}",
        "",
        f"{ext['tokens']} calibration tokens; transforms: {ext['transforms'] or 'none'}.",
        "",
        *(f"![{p}]({p})" for p in plots),
        "",
        "| layer | q in abs-max | q in p99.9 | ratio | down in abs-max | down in p99.9 | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r.get('q_input_absmax', 0):.4g}"
            f" | {r.get('q_input_abs_p999', 0):.4g} | {r.get('q_input_ratio', 0):.3g}"
            f" | {r.get('down_input_absmax', 0):.4g}"
            f" | {r.get('down_input_abs_p999', 0):.4g} | {r.get('down_input_ratio', 0):.3g} |"
        )
    markdown = "\n".join(lines) + "\n" + resources_line(resources)
    write_bytes_atomic(out_dir / "report.md", markdown.encode())
    return report
