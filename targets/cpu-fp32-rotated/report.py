"""Measurements and the human report of ``make cpu``: outliers, per-layer similarity, plot.

One traced forward pass per model records, per decoder layer, the largest |x| and the
RMS of the inputs of q_proj and down_proj (the activations a static int8 scale has to
cover: rotation should shrink max|x| / RMS(x)) and the layer's residual output, so the
rotated model's stream ``h'`` can be compared with ``h·R`` of the original layer by layer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.analysis.accuracy import accuracy_line
from common.analysis.layerwise import Cursor
from common.core.gates import by_name, limit_text
from common.models import ModelAdapter
from common.models.tokenizer_fidelity import describe

#: Linear roles whose inputs are profiled: q_proj reads the attention norm's output
#: (same as k/v), down_proj reads the SwiGLU product (not rotated here: no online R4).
TRACED_ROLES = ("q", "down")


class Tracer:
    """Hooks on every decoder layer: ``max|x|`` and the sum of squares of the traced
    inputs over the first ``windows`` windows, and each layer's output on window 0.

    ``cursor`` says which window runs (a whole-model loop sets it per forward; a
    layer-by-layer run per window of each layer), so both drive the same hooks.
    """

    def __init__(self, adapter: ModelAdapter, windows: int, cursor: Cursor) -> None:
        self.adapter, self.windows, self.cursor = adapter, windows, cursor
        self.stats: dict[tuple[int, str], list] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @contextlib.contextmanager
    def attached(self) -> Iterator[Tracer]:
        handles = []
        for layer in self.adapter.layers():
            for role in TRACED_ROLES:
                handles.append(
                    layer.linears[role].register_forward_pre_hook(self._record((layer.index, role)))
                )
            handles.append(layer.module.register_forward_hook(self._keep(layer.index)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _record(self, key: tuple[int, str]) -> Any:
        def record(_m: nn.Module, args: tuple) -> None:
            if self.cursor.window >= self.windows:
                return
            x = args[0].detach().double()
            entry = self.stats.setdefault(key, [0.0, 0.0, 0])
            entry[0] = max(entry[0], x.abs().max().item())
            entry[1] += x.pow(2).sum().item()
            entry[2] += x.numel()

        return record

    def _keep(self, index: int) -> Any:
        def keep(_m: nn.Module, _a: tuple, out: Any) -> None:
            if self.cursor.window == 0:
                hidden = out[0] if isinstance(out, tuple) else out
                self.outputs[index] = hidden.detach()[0].double()

        return keep

    def result(self) -> dict[str, Any]:
        """Per-layer ``max|x| / RMS(x)`` of each traced input, and the layer outputs
        ``[seq, hidden]`` of window 0 (float64), in layer order."""
        layers = range(self.adapter.num_layers)
        ratios = {
            f"{role}_input": [
                self.stats[(i, role)][0]
                / math.sqrt(self.stats[(i, role)][1] / self.stats[(i, role)][2])
                for i in layers
            ]
            for role in TRACED_ROLES
        }
        return {"ratios": ratios, "outputs": [self.outputs[i] for i in layers]}


def trace(model: nn.Module, adapter: ModelAdapter, windows: torch.Tensor) -> dict[str, Any]:
    """:class:`Tracer`'s records of a whole model over every window of ``windows``."""
    cursor = Cursor()
    tracer = Tracer(adapter, windows.shape[0], cursor)
    with torch.inference_mode(), tracer.attached():
        for i, window in enumerate(windows):
            cursor.window = i
            model(input_ids=window[None], use_cache=False)
    return tracer.result()


def per_layer_similarity(
    original: list[torch.Tensor], rotated: list[torch.Tensor], r: torch.Tensor
) -> list[dict[str, float]]:
    """Cosine (mean over tokens) and max |diff| of ``h'`` vs ``h·R`` for each layer output."""
    rows = []
    for h, h_rot in zip(original, rotated, strict=True):
        want = h @ r
        cosine = torch.nn.functional.cosine_similarity(h_rot, want, dim=-1)
        rows.append(
            {
                "hidden_cosine_mean": cosine.mean().item(),
                "hidden_cosine_min": cosine.min().item(),
                "hidden_max_abs_diff": (h_rot - want).abs().max().item(),
                "hidden_max_abs": want.abs().max().item(),
            }
        )
    return rows


def plot_outliers(path: Path, before: dict[str, list], after: dict[str, list], title: str) -> None:
    """Per-layer max|x|/RMS(x) before and after rotation, one panel per traced input."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(TRACED_ROLES), figsize=(11, 4), sharey=True)
    for ax, role in zip(axes, TRACED_ROLES, strict=True):
        key = f"{role}_input"
        layers = range(len(before[key]))
        ax.plot(layers, before[key], marker="o", ms=3, label="original")
        ax.plot(layers, after[key], marker="s", ms=3, label="rotated")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_title(f"{role}_proj input")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("max|x| / RMS(x)")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)


def render_markdown(report: dict[str, Any], plot_name: str) -> str:
    """``report.md``: the gates, the end-to-end numbers, then one row per layer."""
    gates = by_name(report["gates"])
    verdict = "PASS" if report["passed"] else "FAIL"
    lines = [
        f"# cpu-fp32-rotated: {report['model']} — {verdict}",
        "",
        f"Rotation: `{report['rotation']['mode']}`, seed {report['rotation']['seed']}"
        + (f", from `{report['rotation']['R_path']}`" if report["rotation"].get("R_path") else "")
        + f"; evaluated on {report['num_windows']} × {report['seq_len']} held-out tokens.",
        "",
        "| metric | value | gate |",
        "|---|---|---|",
        f"| ppl original (fp32) | {report['ppl_fp32']:.6f} | |",
        f"| ppl rotated | {report['ppl_rotated']:.6f} | |",
        f"| ppl ratio | {report['ppl_ratio']:.7f} | {limit_text(gates['ppl_ratio'])} |",
        f"| top-1 agreement | {report['top1_agreement']:.6f} | "
        f"{limit_text(gates['top1_agreement'])} |",
        f"| logits max abs diff | {report['max_abs_logit_diff']:.3g} | |",
        f"| logits cosine (mean / min) | {report['cosine_mean']:.9f} / "
        f"{report['cosine_min']:.9f} | |",
    ]
    image = report.get("image_prompt")
    if image:
        lines.append(
            f"| image prompt: top-1 / max abs diff | {image['top1_agreement']:.6f} / "
            f"{image['max_abs_diff']:.3g} | top-1 {limit_text(gates['image_top1_agreement'])} |"
        )
    mllm = report["mllm"]
    lines += [
        f"| tokenizer | {describe(report['tokenizer'])} | ids equal |",
        f"| model.mllm | {mllm['tensors']} tensors, {mllm['bytes']} bytes, "
        f"read back bit-exact: {mllm['verified']} | |",
        "",
        accuracy_line(report["accuracy"]),
        "",
        f"![max|x|/RMS(x) per layer]({plot_name})",
        "",
        "Per layer: outlier ratio max|x| / RMS(x) of the q_proj and down_proj inputs over the "
        "traced windows (original → rotated), and the rotated residual stream h' against h·R "
        "of the original (first window).",
        "",
        "| layer | q_proj in: orig → rot | down_proj in: orig → rot | h' vs h·R cosine min "
        "| max abs diff |",
        "|---|---|---|---|---|",
    ]
    for row in report["per_layer"]:
        lines.append(
            f"| {row['layer']} | {row['q_input_ratio_original']:.1f} → "
            f"{row['q_input_ratio_rotated']:.1f} | {row['down_input_ratio_original']:.1f} → "
            f"{row['down_input_ratio_rotated']:.1f} | {row['hidden_cosine_min']:.9f} | "
            f"{row['hidden_max_abs_diff']:.3g} |"
        )
    lines += ["", "The vision tower (VL models) is not rotated; its merger's last linear is."]
    return "\n".join(lines) + "\n"
