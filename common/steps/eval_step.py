"""The ``make eval`` step: held-out perplexity and a canary prompt, written as a report.

Perplexity uses fixed consecutive windows of the held-out corpus, so two checkpoints (or a
checkpoint before and after a transform) are scored on exactly the same tokens. A recipe
may name a prompt and an expected substring of the greedy answer: a real model that no
longer answers "Paris" is broken however good its perplexity looks.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from common.core.errors import CheckFailed
from common.core.recipes import Recipe, model_build_dir
from common.core.records import atomic_path, build_manifest, write_bytes_atomic, write_json_atomic
from common.core.resources import resources_line
from common.steps.phases import Run
from common.steps.preflight import layerwise_preflight

DEFAULT_SEQ_LEN = 512
DEFAULT_NUM_WINDOWS = 16
DEFAULT_MAX_NEW_TOKENS = 24


def render_report(report: dict[str, Any]) -> tuple[str, str]:
    """The report for people: (Markdown document, plain console table)."""
    rows = [
        ("model", report["model"]),
        ("model_type", report["model_type"]),
        ("corpus", report["corpus"]),
        ("windows × seq_len", f"{report['num_windows']} × {report['seq_len']}"),
        ("scored tokens", report["tokens"]),
        ("perplexity", f"{report['ppl']:.4f}"),
    ]
    generation = report.get("generation")
    if generation:
        rows.append(("prompt", generation["prompt"]))
        rows.append(("answer", generation["output"].replace("\n", " ")))
        if generation.get("expect") is not None:
            verdict = "pass" if generation["passed"] else "FAIL"
            rows.append((f"contains {generation['expect']!r}", verdict))
    width = max(len(k) for k, _ in rows)
    lines = [f"# Evaluation: {report['model']}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    table = "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
    return "\n".join(lines) + "\n" + resources_line(report["resources"]), table


def run_eval(
    recipe: Recipe,
    model_dir: Path,
    *,
    corpus: Path,
    build_dir: Path | None = None,
    seq_len: int | None = None,
    num_windows: int | None = None,
    max_memory: int | None = None,
    sequential: bool | None = None,
) -> dict[str, Any]:
    """Evaluate ``model_dir``; write ``build/<MODEL>/eval/{report.json,report.md,manifest.json}``.

    Raises :class:`CheckFailed` (after writing the report) when the canary answer lacks
    the recipe's expected text. A model that runs its own code (Qwen1) is refused first:
    only the steps built for it load it. Text models run one part at a time (the same
    numbers and answer; ``sequential`` False loads the whole model), others whole.
    """
    from common.analysis.eval import greedy_answer_layerwise, greedy_generate, perplexity
    from common.analysis.simulate import score_model
    from common.inputs.data import eval_windows
    from common.models.loading import load_model, load_tokenizer, refuse_remote_code

    refuse_remote_code(model_dir, "make eval")
    run = Run("eval", ("load", "evaluate", "package"))
    run.phase("load")
    defaults = recipe.eval_defaults
    seq_len = seq_len or defaults.get("seq_len", DEFAULT_SEQ_LEN)
    num_windows = num_windows or defaults.get("num_windows", DEFAULT_NUM_WINDOWS)
    tokenizer = load_tokenizer(model_dir)
    windows = eval_windows([corpus], tokenizer, num_windows, seq_len)
    streamed = layerwise_preflight(
        run,
        model_dir,
        "make eval",
        max_memory,
        held=lambda adapter: {
            "hidden states": 2 * windows.numel() * adapter.hidden_size * 4,
            "one window's logits": seq_len * adapter.vocab_size * 4,
        },
        copies={"float32 model": 1},
        sequential=sequential,
        lower="lower NUM_WINDOWS or SEQ_LEN",
    )
    model = None if streamed is not None else load_model(model_dir)
    run.phase("evaluate")
    if model is None:
        scores = score_model(model_dir, windows, streamed=streamed)
    else:
        scores = perplexity(model, windows)
    report: dict[str, Any] = {
        "model": recipe.name,
        "model_type": recipe.model_type,
        "model_dir": str(model_dir),
        "corpus": str(corpus),
        "seq_len": seq_len,
        "num_windows": num_windows,
        "layer_by_layer": model is None,
        "tokens": scores["tokens"],
        "nll": scores["nll"],
        "ppl": scores["ppl"],
    }
    prompt = defaults.get("prompt")
    if prompt:
        max_new_tokens = defaults.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if model is None:
            output = greedy_answer_layerwise(streamed, tokenizer, prompt, max_new_tokens)
        else:
            output = greedy_generate(model, tokenizer, prompt, max_new_tokens)
        expect = defaults.get("expect")
        report["generation"] = {
            "prompt": prompt,
            "output": output,
            "expect": expect,
            "passed": None if expect is None else expect in output,
        }
    run.phase("package")
    report["resources"] = run.resources()  # the package phase up to this point
    markdown, table = render_report(report)
    out_dir = model_build_dir(recipe, build_dir) / "eval"
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        write_json_atomic(tmp / "report.json", report)
        write_bytes_atomic(tmp / "report.md", markdown.encode())
        manifest = build_manifest(
            step="eval",
            inputs={"corpus": corpus, "model_config": model_dir / "config.json"},
            outputs=tmp,
            recipe=recipe.data,
            options={"seq_len": seq_len, "num_windows": num_windows},
        )
        write_json_atomic(tmp / "manifest.json", manifest)
    run.finish()
    print(table, file=sys.stdout)
    print(f"[eval] wrote {out_dir / 'report.json'}", file=sys.stderr)
    generation = report.get("generation")
    if generation and generation["passed"] is False:
        raise CheckFailed(
            f"{recipe.name}: the answer to {prompt!r} does not contain {generation['expect']!r}: "
            f"{generation['output']!r} (report: {out_dir / 'report.json'})"
        )
    return report
