"""Gates: the one record every report uses for a pass/fail check of an artifact.

A gate says what was measured, the comparison, the limit, and the verdict, so a reader of
any ``report.json`` (or a script over several) finds every check in ``report["gates"]``
in the same shape: ``{"name", "value", "op", "limit", "passed"}`` (plus ``"detail"`` where
one number does not say which part failed, e.g. the pieces below a cosine floor).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
    "within": lambda value, bounds: bounds[0] <= value <= bounds[1],
}


@dataclass(frozen=True)
class Gate:
    """One check: ``value op limit`` (``within``: ``limit[0] <= value <= limit[1]``)."""

    name: str
    value: Any
    op: str
    limit: Any
    passed: bool
    detail: str | None = None

    def record(self) -> dict[str, Any]:
        """The shape written into ``report.json["gates"]``."""
        out = {
            "name": self.name,
            "value": self.value,
            "op": self.op,
            "limit": list(self.limit) if self.op == "within" else self.limit,
            "passed": self.passed,
        }
        if self.detail is not None:
            out["detail"] = self.detail
        return out

    def describe(self) -> str:
        """``top1_agreement: 0.931 (needs >= 0.95)``, with the detail where there is one."""
        value = f"{self.value:.6g}" if isinstance(self.value, float) else repr(self.value)
        limit = f"[{self.limit[0]:.6g}, {self.limit[1]:.6g}]" if self.op == "within" else self.limit
        text = f"{self.name}: {value} (needs {self.op} {limit})"
        return f"{text}, {self.detail}" if self.detail else text


def gate(name: str, value: Any, op: str, limit: Any, detail: str | None = None) -> Gate:
    """Evaluate ``value op limit``; a NaN or missing value fails."""
    if op not in _OPS:
        raise ValueError(f"gate {name}: unknown comparison {op!r}; use one of {sorted(_OPS)}")
    if op == "within" and (not isinstance(limit, Sequence) or len(limit) != 2):
        raise ValueError(f"gate {name}: 'within' needs [low, high], got {limit!r}")
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    passed = False if missing else bool(_OPS[op](value, limit))
    return Gate(name, value, op, limit, passed, detail)


def records(gates: Iterable[Gate]) -> list[dict[str, Any]]:
    """``report.json["gates"]``: every gate's record, in the order they were checked."""
    return [g.record() for g in gates]


def from_record(record: dict[str, Any]) -> Gate:
    """The gate a ``report.json`` record was written from."""
    return Gate(
        record["name"],
        record["value"],
        record["op"],
        tuple(record["limit"]) if record["op"] == "within" else record["limit"],
        record["passed"],
        record.get("detail"),
    )


def failures(gates: Iterable[Gate | dict[str, Any]]) -> list[str]:
    """One line per failed gate (empty when everything passed); gates or their records."""
    checked = [g if isinstance(g, Gate) else from_record(g) for g in gates]
    return [g.describe() for g in checked if not g.passed]


def limit_text(record: dict[str, Any]) -> str:
    """``≥ 0.999`` / ``within [0.999, 1.001]``: a record's requirement, for report.md."""
    symbols = {">=": "≥", "<=": "≤", ">": ">", "<": "<", "==": "="}
    if record["op"] == "within":
        low, high = record["limit"]
        return f"within [{low:.6g}, {high:.6g}]"
    return f"{symbols[record['op']]} {record['limit']}"


def by_name(report_gates: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A report's gate records keyed by name (names are unique within a report)."""
    return {g["name"]: g for g in report_gates}


def markdown_table(report_gates: Sequence[dict[str, Any]]) -> list[str]:
    """report.md lines: one row per gate record (value, requirement, verdict)."""
    lines = ["| gate | value | requirement | result |", "|---|---|---|---|"]
    for g in report_gates:
        value = f"{g['value']:.6g}" if isinstance(g["value"], float) else str(g["value"])
        verdict = "pass" if g["passed"] else "**FAIL**"
        detail = f" ({g['detail']})" if g.get("detail") else ""
        lines.append(f"| {g['name']} | {value} | {limit_text(g)} | {verdict}{detail} |")
    return lines
