"""The gates and the human report of ``make qnn``: per-piece similarity table and plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.analysis.accuracy import accuracy_line
from common.core.gates import Gate, failures, gate, markdown_table
from common.models.tokenizer_fidelity import describe


def gates(
    report: dict[str, Any],
    limits: dict[str, float],
    mllm_max_abs: float,
    vision_limits: dict[str, float] | None = None,
) -> list[Gate]:
    """The build's gates: every piece's cosine vs float and all of it on QNN, end-to-end
    top-1 agreement on text and, for a vision-language model, on picture prompts (where
    the preset sets a floor), the int8 .mllm against fake-quant. A vision-language model's
    vision pieces are held to ``vision_limits`` (their own preset's), and the whole image
    chain (vision binaries, then language binaries) to the language preset's top-1."""
    checks = _piece_gates("piece", report["layers"], limits["layer_cos"])
    vision = report.get("vision_pieces")
    if vision and vision_limits:
        checks += _piece_gates("vision_piece", vision, vision_limits["layer_cos"])
    if limits["top1"] > 0:
        top1 = report["end_to_end"]["top1_agreement"]
        checks.append(gate("end_to_end_top1_agreement", top1, ">=", limits["top1"]))
        for key in ("picture_prompts", "image_chain"):
            if report.get(key):
                top1 = report[key]["top1_agreement"]
                checks.append(gate(f"{key}_top1_agreement", top1, ">=", limits["top1"]))
        decode = (report.get("image_chain") or {}).get("decode")
        if decode:
            top1 = decode["top1_agreement"]
            checks.append(gate("image_chain_decode_top1_agreement", top1, ">=", limits["top1"]))
    diff = report["mllm_int8"]["max_abs_diff"]
    checks.append(gate("mllm_int8_max_abs_diff", diff, "<=", mllm_max_abs))
    return checks


def _piece_gates(kind: str, rows: list[dict[str, Any]], floor: float) -> list[Gate]:
    """Worst cosine vs float over the ``rows`` the emulator ran (every one unless
    ``VERIFY=sample``, which the gate's detail then says) and every one all on QNN."""
    scored = [r for r in rows if r["emulated"]]
    low = [r["name"] for r in scored if r["cos_vs_float"] < floor]
    details = [f"below: {', '.join(low)}"] if low else []
    if len(scored) < len(rows):
        details.append(f"{len(scored)} of {len(rows)} pieces on the emulator (VERIFY=sample)")
    off = [r["name"] for r in rows if not r["all_nodes_on_qnn"]]
    return [
        gate(f"min_{kind}_cos_vs_float", min(r["cos_vs_float"] for r in scored), ">=", floor,
             "; ".join(details) or None),
        gate(f"{kind}s_not_all_on_qnn", len(off), "==", 0, ", ".join(off) or None),
    ]  # fmt: skip


def plot_layers(rows: list[dict[str, Any]], dest: Path) -> None:
    """Per-piece cosine vs float and vs CPU QDQ (log-scaled distance from 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.25), 3.5))
    for key, label in (("cos_vs_float", "HTP vs float"), ("cos_vs_cpu_qdq", "HTP vs CPU QDQ")):
        ran = [i for i, r in enumerate(rows) if r["emulated"]]  # VERIFY=sample: not all
        ax.plot(ran, [max(1 - rows[i][key], 1e-9) for i in ran], "o-", label=label)
    ax.set_yscale("log")
    ax.set_ylabel("1 - cosine")
    ax.set_xticks(range(len(rows)), names, rotation=90, fontsize=6)
    ax.legend()
    fig.tight_layout()
    fig.savefig(dest, dpi=100, metadata={"Software": None})
    plt.close(fig)


def render(report: dict[str, Any]) -> str:
    """report.md: settings, binaries, per-piece table, end to end, int8 .mllm check."""
    e2e, mllm = report["end_to_end"], report["mllm_int8"]
    pieces = (report.get("vision_pieces") or []) + report["layers"]
    failed = failures(report["gates"])
    lines = [
        f"# QNN HTP: {report['model']} ({report['preset']}, {report['rounding']} weight "
        f"rounding, PREFILL_LEN={report['prefill_len']}, KV_LEN={report['kv_len']})",
        "",
        f"QNN SDK {report['qnn_version']} (onnxruntime-qnn "
        f"{report['versions']['onnxruntime-qnn']}); SoCs: "
        + ", ".join(f"{n} ({s['soc_model']}/v{s['htp_arch']})" for n, s in report["socs"].items()),
        "Numbers are from Qualcomm's x86 HTP emulator; loading and latency on a device are "
        "not proven here.",
        "",
        "Residual stream and RMSNorms in float (fp16 on HTP); linears kept float "
        "(shadow / beyond the 16-bit ratio): "
        + (", ".join(report["float_linears"]) or "none")
        + ".",
        "",
        "![per-piece similarity](layers.png)",
        "",
        "| piece | HTP vs float | HTP vs CPU QDQ | CPU QDQ vs float | all on QNN |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['name']} | {_htp(r, 'cos_vs_float')} | {_htp(r, 'cos_vs_cpu_qdq')} | "
        f"{r['cpu_qdq_cos_vs_float']:.6f} | {'yes' if r['all_nodes_on_qnn'] else 'NO'} |"
        for r in pieces
    ]
    lines += [
        "",
        _ranked_line(pieces),
        *[line for note in report.get("notes", []) for line in ("", note)],
        "",
        f"End to end (prefill chain on HTP, float LM head on host, {e2e['tokens']} tokens "
        f"in {e2e['windows']} held-out windows): "
        f"logit cosine {e2e['cos']:.6f}, top-1 agreement {e2e['top1_agreement']:.4f}.",
        "",
        accuracy_line(e2e["accuracy"]),
        "",
        *_picture_lines(report.get("picture_prompts")),
        *_chain_lines(report.get("image_chain")),
        f"model.int8.mllm re-read vs fake-quant model: max |Δlogit| {mllm['max_abs_diff']:.3g}.",
        "",
        f"`tokenizer/`: {describe(report['tokenizer'])}.",
        "",
        *_processor_lines(report.get("processor")),
        *markdown_table(report["gates"]),
        "",
        "Gates: " + ("all passed" if not failed else "FAILED: " + "; ".join(failed)),
        "",
    ]
    return "\n".join(lines)


#: How many pieces report.md names as losing the most accuracy.
RANKED = 5


def ranked_losses(rows: list[dict[str, Any]], count: int = RANKED) -> list[tuple[str, float]]:
    """The ``count`` emulated pieces farthest from float (``1 - cos_vs_float``), worst
    first: each piece ran on the float model's own inputs, so this is the error each adds
    by itself, the place to look first when the end-to-end figure falls short."""
    losses = [(r["name"], 1.0 - r["cos_vs_float"]) for r in rows if r["emulated"]]
    return sorted(losses, key=lambda loss: (-loss[1], loss[0]))[:count]


def _ranked_line(rows: list[dict[str, Any]]) -> str:
    worst = ", ".join(f"{name} ({loss:.2e})" for name, loss in ranked_losses(rows))
    return f"Pieces losing the most accuracy (1 - cosine vs float, on the emulator): {worst}."


def _htp(row: dict[str, Any], key: str) -> str:
    """An emulator cosine of the per-piece table, or why there is none."""
    return f"{row[key]:.6f}" if row["emulated"] else "not run (VERIFY=sample)"


def _picture_lines(pictures: dict[str, Any] | None) -> list[str]:
    """The picture prompts' end-to-end line (vision-language models)."""
    if not pictures:
        return []
    return [
        f'Picture prompts ("{pictures["prompt"]}" after each of {", ".join(pictures["images"])} '
        f"at {pictures['image_size']} px, {'/'.join(map(str, pictures['vision_tokens']))} "
        "vision tokens from the float vision tower on the host, spliced over the placeholder "
        "rows; 3-row M-RoPE positions; prefill chain on HTP, float LM head on host; "
        f"{pictures['tokens']} rows from each picture's first vision token on): logit cosine "
        f"{pictures['cos']:.6f}, top-1 agreement "
        f"{pictures['top1_agreement']:.4f}.",
        "",
    ]


def _chain_lines(chain: dict[str, Any] | None) -> list[str]:
    """The image chain's line: pictures through the vision binaries, then the language
    binaries (vision-language models)."""
    if not chain:
        return []
    merged, decode = chain["vision_merged_vs_torch"], chain["decode"]
    return [
        f"Image chain (each picture through the vision binaries ({chain['vision_preset']}), "
        "their merged tokens spliced into the same prompts followed by the float model's "
        f"greedy continuation ({'/'.join(map(str, chain['generated_tokens']))} tokens, "
        "teacher-forced), prefill chain on HTP, float LM head on host, against the float "
        "tower and float language model): vision output vs Hugging Face's tower cosine "
        f"{merged['cos']:.6f} (max |Δ| {merged['max_abs']:.3g}); logit cosine "
        f"{chain['cos']:.6f}, top-1 agreement {chain['top1_agreement']:.4f} over "
        f"{chain['tokens']} rows; the first generated token's: logit cosine "
        f"{chain['next_token_cos']:.6f}, same argmax in {chain['next_token_agreement']:.0%} "
        "of the prompts. The generated tokens through the decode binaries (one step each "
        "over the K/V the prefill binaries wrote): logit cosine "
        f"{decode['cos']:.6f}, top-1 agreement {decode['top1_agreement']:.4f} over "
        f"{decode['tokens']} steps.",
        "",
    ]


def _processor_lines(processor: dict[str, Any] | None) -> list[str]:
    """The packaged processor's line (vision-language models)."""
    if not processor:
        return []
    return [
        f"`tokenizer/` processor ({', '.join(processor['files'])}), loaded with "
        f"`AutoProcessor`: prepares the {processor['pictures']} pictures at "
        f"{processor['image_size']} px into the same ids, pixels and grids as the model's.",
        "",
    ]
