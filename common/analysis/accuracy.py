"""The accuracy block every artifact's report carries, so builds of different targets and
presets compare on one figure.

Each target runs its *artifact's own graph* (the HTP emulator, the reloaded checkpoint, the
rotated model as written) on held-out text windows beside the float model and feeds both
logits to :class:`common.analysis.eval.LogitComparison`; :func:`accuracy_block` turns that
comparison into the same fields everywhere:

* ``ppl_ratio``: the artifact's held-out perplexity over the float model's, on the same
  windows and targets (1.0 = no loss);
* ``top1_agreement``: how often the artifact's argmax is the float model's, with its 95 %
  Wilson interval from the number of rows compared (``top1_interval_95``): 256 rows at
  0.977 are [0.950, 0.989], so a 0.98 target cannot be told from 0.95 on them;
* ``windows_for_1pct``: how many windows of this length put the interval within ±1 %
  at the agreement measured, stated when the run had fewer.
"""

from __future__ import annotations

import math
from typing import Any

#: Two-sided 95 % normal quantile.
Z95 = 1.959963984540054
#: The interval half-width the figure aims at.
TARGET_HALF_WIDTH = 0.01


def _wilson(p: float, trials: int, z: float) -> tuple[float, float]:
    """The Wilson interval of proportion ``p`` over ``trials`` (ends exact at 0 and 1)."""
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return (0.0 if p == 0 else centre - spread), (1.0 if p == 1 else centre + spread)


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion: unlike ``p ± z·se`` it stays
    inside [0, 1] and is not empty at p = 1, which agreement near 1 needs."""
    if trials <= 0:
        raise ValueError(f"wilson_interval: trials={trials}; expected >= 1")
    if not 0 <= successes <= trials:
        raise ValueError(f"wilson_interval: successes={successes} outside [0, {trials}]")
    return _wilson(successes / trials, trials, z)


def rows_for_half_width(p: float, half_width: float = TARGET_HALF_WIDTH, z: float = Z95) -> int:
    """The fewest rows whose Wilson interval at proportion ``p`` is at most
    ±``half_width`` wide (bisection: the width falls as rows grow)."""

    def fits(rows: int) -> bool:
        low, high = _wilson(p, rows, z)
        return (high - low) / 2 <= half_width

    low, high = 1, 1
    while not fits(high):
        low, high = high, 2 * high
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle + 1, high)
    return high


def accuracy_block(comparison: dict[str, Any], graph: str, rows_per_window: int) -> dict[str, Any]:
    """The report's accuracy block from a :meth:`LogitComparison.result` of the artifact
    (``got``) against the float model (``want``) on held-out windows of
    ``rows_per_window`` compared rows each; ``graph`` says what computed the artifact's
    logits (``"QNN HTP emulator, every piece"``)."""
    rows = int(comparison["tokens"])
    top1 = float(comparison["top1_agreement"])
    agreed = round(top1 * rows)
    low, high = wilson_interval(agreed, rows)
    needed = rows_for_half_width(top1)
    return {
        "graph": graph,
        "ppl_ratio": comparison["ppl"] / comparison["ppl_reference"],
        "ppl": comparison["ppl"],
        "ppl_reference": comparison["ppl_reference"],
        "ppl_tokens": int(comparison["ppl_tokens"]),
        "top1_agreement": top1,
        "top1_interval_95": [low, high],
        "rows": rows,
        "windows": rows // max(rows_per_window, 1),
        "windows_for_1pct": math.ceil(needed / max(rows_per_window, 1)),
    }


def accuracy_line(block: dict[str, Any]) -> str:
    """One markdown line of the block, the same in every target's ``report.md``."""
    low, high = block["top1_interval_95"]
    line = (
        f"**Accuracy** ({block['graph']}; {block['windows']} held-out windows, "
        f"{block['rows']} rows): perplexity ratio to float {block['ppl_ratio']:.4f}, top-1 "
        f"agreement {block['top1_agreement']:.4f} (95 % interval {low:.4f}-{high:.4f})."
    )
    if (high - low) / 2 > TARGET_HALF_WIDTH:
        line += f" A ±1 % interval needs about {block['windows_for_1pct']} windows of this length."
    return line
