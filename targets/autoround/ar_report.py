"""The AutoRound step's report: numbers, gates, and their Markdown/console renderings.

Pure functions of the measured results, so the gate logic is testable without a model.
Gates per format: the reload is structurally right (every planned layer quantized, nothing
else, no missing or unused tensors); held-out perplexity within ``max_ppl_ratio`` of the
float model; and lower than plain round-to-nearest at the same bits/group.
"""

from __future__ import annotations

import json
from typing import Any

from common.analysis.accuracy import accuracy_block, accuracy_line
from common.core.gates import Gate, failures, gate, markdown_table, records
from common.models.tokenizer_fidelity import describe


def jsonl_line(text: str) -> str:
    """One ``{"text": ...}`` JSON line (the corpus reader's record format)."""
    return json.dumps({"text": text}, ensure_ascii=False) + "\n"


def _ratio(ppl: float | None, ppl_fp: float) -> float | None:
    return None if ppl is None else ppl / ppl_fp


def format_gates(
    fmt: str, result: dict[str, Any], fp: dict[str, Any], rtn: dict[str, Any], options: Any
) -> list[Gate]:
    """``fmt``'s gates: a structurally exact reload, then (only when there is a model to
    score) the perplexity ratio to float and beating RTN on the chosen measure(s)."""
    problems = result["problems"]
    checks = [gate(f"{fmt}.reload_problems", len(problems), "==", 0, "; ".join(problems) or None)]
    if problems:
        return checks
    ratio = result["ppl"] / fp["ppl"]
    checks.append(gate(f"{fmt}.ppl_ratio", ratio, "<=", options.max_ppl_ratio))
    if options.rtn_gate in ("both", "ppl"):
        checks.append(gate(f"{fmt}.ppl_below_rtn", result["ppl"], "<", rtn["ppl"]))
    if options.rtn_gate in ("both", "cosine"):
        checks.append(
            gate(f"{fmt}.cosine_above_rtn", result["cosine_mean"], ">", rtn["cosine_mean"])
        )
    return checks


def format_accuracy(
    fmt: str, result: dict[str, Any], ppl_fp: float, eval_shape: list[int]
) -> dict[str, Any]:
    """The common accuracy block of one reloaded export: its perplexity over every
    held-out window (``eval_shape`` ``[windows, seq]``), its top-1 agreement over the
    compared windows' rows (``result["tokens"]``)."""
    windows, seq = eval_shape
    comparison = {
        "ppl": result["ppl"], "ppl_reference": ppl_fp, "ppl_tokens": windows * (seq - 1),
        "top1_agreement": result["top1_agreement"], "tokens": result["tokens"],
    }  # fmt: skip
    return accuracy_block(comparison, f"the {fmt} export as reloaded", seq)


def build_report(
    *,
    recipe: str,
    model_type: str,
    options: Any,
    planned: list[str],
    fp: dict[str, Any],
    rtn: dict[str, Any],
    per_format: dict[str, dict[str, Any]],
    quantize_seconds: float,
    eval_shape: list[int],
    image: str | None,
    image_prompt: str | None,
) -> dict[str, Any]:
    """The overall report; top-level AutoRound numbers are those of the first format."""
    ppl_fp, ppl_rtn = fp["ppl"], rtn["ppl"]
    all_gates: list[dict[str, Any]] = []
    for fmt, result in per_format.items():
        result["ppl_ratio"] = _ratio(result.get("ppl"), ppl_fp)
        if result.get("ppl") is not None:  # reloaded and scored
            result["accuracy"] = format_accuracy(fmt, result, ppl_fp, eval_shape)
        checks = format_gates(fmt, result, fp, rtn, options)
        result["gates"] = records(checks)
        result["failures"] = failures(checks)
        all_gates += result["gates"]
    primary = per_format[options.formats[0]]
    return {
        "model": recipe,
        "model_type": model_type,
        "bits": options.bits,
        "group_size": options.group_size,
        "sym": options.sym,
        "iters": options.iters,
        "nsamples": options.nsamples,
        "seqlen": options.seqlen,
        "quant_nontext_module": options.quant_nontext_module,
        "formats": list(options.formats),
        "options": options.as_record(),
        "quantized_layers_planned": len(planned),
        "eval": {"corpus": "data/web-bible/eval.jsonl.zst", "windows": eval_shape},
        "ppl_fp": ppl_fp,
        "ppl_rtn": ppl_rtn,
        "ppl_rtn_ratio": ppl_rtn / ppl_fp,
        "ppl_autoround": primary.get("ppl"),
        "ppl_ratio": primary.get("ppl_ratio"),
        "top1_agreement": primary.get("top1_agreement"),
        "cosine_mean": primary.get("cosine_mean"),
        "accuracy": primary.get("accuracy"),
        "tokenizer": primary.get("tokenizer"),
        "quantize_seconds": quantize_seconds,
        "rtn": rtn,
        "per_format": per_format,
        "image": image,
        "image_prompt": image_prompt,
        "max_ppl_ratio": options.max_ppl_ratio,
        "rtn_gate": options.rtn_gate,
        "gates": all_gates,
        "failures": failures(all_gates),
        "passed": all(g["passed"] for g in all_gates),
    }


def format_report(report: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The report as seen from one format's folder: its numbers at the top level."""
    result = report["per_format"][fmt]
    return {
        **report,
        "format": fmt,
        "ppl_autoround": result.get("ppl"),
        "ppl_ratio": result.get("ppl_ratio"),
        "top1_agreement": result.get("top1_agreement"),
        "cosine_mean": result.get("cosine_mean"),
        "accuracy": result.get("accuracy"),
        "tokenizer": result.get("tokenizer"),
        "per_format": {fmt: result},
        "gates": result["gates"],
        "failures": result["failures"],
        "passed": not result["failures"],
    }


def _num(value: Any, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _rows(report: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """(method, ppl, ratio, cosine, top-1, verdict) for RTN and every format."""
    rtn = report["rtn"]
    rows = [
        ("float", _num(report["ppl_fp"]), "1.0000", "1.000000", "1.0000", "reference"),
        ("RTN", _num(rtn["ppl"]), _num(report["ppl_rtn_ratio"]), _num(rtn["cosine_mean"], 6),
         _num(rtn["top1_agreement"]), "baseline"),
    ]  # fmt: skip
    for fmt, result in report["per_format"].items():
        verdict = "pass" if not result["failures"] else "FAIL"
        rows.append(
            (f"AutoRound {fmt}", _num(result.get("ppl")), _num(result.get("ppl_ratio")),
             _num(result.get("cosine_mean"), 6), _num(result.get("top1_agreement")), verdict)
        )  # fmt: skip
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    """The report for people: setup, end-to-end table, per-layer cosines, image prompt."""
    lines = [
        f"# AutoRound: {report['model']} ({report['model_type']})",
        "",
        f"W{report['bits']} group {report['group_size']} {'sym' if report['sym'] else 'asym'}, "
        f"iters {report['iters']}, {report['nsamples']} x {report['seqlen']} calibration "
        f"tokens, quant_nontext_module={report['quant_nontext_module']}; "
        f"{report['quantized_layers_planned']} layers quantized; tuning + export "
        f"{report['quantize_seconds']:.1f} s.",
        "",
        f"Held-out: {report['eval']['corpus']}, windows {report['eval']['windows']}. Gates: "
        f"ppl ratio <= {report['max_ppl_ratio']}, beats RTN on {report['rtn_gate']} "
        "(ppl lower / logits cosine higher), reload structurally exact.",
        "",
        "| method | ppl | ratio | logits cosine | top-1 | verdict |",
        "|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(report)]
    blocks = [r["accuracy"] for r in report["per_format"].values() if "accuracy" in r]
    lines += [line for block in blocks for line in ("", accuracy_line(block))]
    formats = [f for f, r in report["per_format"].items() if "layers" in r]
    layer_names = list(report["rtn"]["layers"])
    lines += ["", "## Per-layer output cosine (first held-out window)", ""]
    lines += ["| layer | RTN | " + " | ".join(formats) + " |"]
    lines += ["|---" * (2 + len(formats)) + "|"]
    for name in layer_names:
        cells = [_num(report["rtn"]["layers"][name], 6)]
        cells += [_num(report["per_format"][f]["layers"][name], 6) for f in formats]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"RTN baseline: {report['rtn']['baseline']}.", "", "## Reload", ""]
    for fmt, result in report["per_format"].items():
        tensor_types = result["quantization_config"].get("tensor_types")
        stored = (
            f"GGUF tensor types {tensor_types} (planned layers: {', '.join(result['kernels'])})"
            if tensor_types
            else f"kernels {', '.join(result['kernels']) or 'none'}"
        )
        lines.append(f"- {fmt}: {result['quantized_layers']} quantized layers, {stored}")
        if result.get("tokenizer"):
            lines.append(f"  - tokenizer: {describe(result['tokenizer'])}")
        prompt = result.get("image_prompt")
        if prompt:
            lines.append(
                f"  - image prompt {report['image_prompt']!r} on {report['image']}: cosine "
                f"{prompt['cosine_mean']:.6f}, top-1 {prompt['top1_agreement']:.4f}; answer "
                f"{prompt['answer']!r} (float: {prompt['answer_fp']!r})"
            )
    lines += ["", "## Gates", "", *markdown_table(report["gates"])]
    if report["failures"]:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in report["failures"]]
    return "\n".join(lines) + "\n"


def console_table(report: dict[str, Any]) -> str:
    """The end-to-end table as plain aligned text."""
    header = ("method", "ppl", "ratio", "cosine", "top-1", "verdict")
    rows = [header, *_rows(report)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join("  " + line for line in lines)
