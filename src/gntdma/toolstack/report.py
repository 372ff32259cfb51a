"""Checks and the report of a run: what passed, what failed, and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Check", "Report"]


@dataclass(frozen=True, slots=True)
class Check:
    """One verified claim of a run."""

    name: str
    ok: bool
    detail: str = ""


@dataclass(slots=True)
class Report:
    """Every check of a run, plus figures for the summary and the JSON report."""

    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks], **self.figures}

    def format(self) -> str:
        width = max((len(c.name) for c in self.checks), default=0)
        lines = []
        for c in self.checks:
            mark = "ok  " if c.ok else "FAIL"
            lines.append(f"  [{mark}] {c.name:<{width}}  {c.detail}".rstrip())
        failed = sum(1 for c in self.checks if not c.ok)
        for name, t in self.figures.get("kernel_tunables", {}).items():
            lines.append(f"  kernel {name}: {t['text']}")
        plots = self.figures.get("plots")
        if plots:
            lines.append(f"  plots: {', '.join(plots)}")
        lines.append(f"{len(self.checks) - failed} passed, {failed} failed")
        return "\n".join(lines)
