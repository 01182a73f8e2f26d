"""The report ``patch_model`` returns: one entry per norm-like module, what happened to it and
why. It is a list of plain dicts (so ``json.dumps(report)`` works and it iterates like any
list) that prints as a table."""

from __future__ import annotations

from typing import Optional

FUSED = "fused"  # same function, now on the fused kernels
EXACT = "exact"  # LayerNorm converted to RMSNorm with the model's function preserved
APPROXIMATE = "approximate"  # converted on request; the function changed (by a reported amount)
SKIPPED = "skipped"  # left as it was, with the reason
CHANGES = (FUSED, EXACT, APPROXIMATE, SKIPPED)
NOT_SELECTED = "not selected by include/exclude"


class PatchReport(list):
    """Entries are dicts: ``name`` (dotted module path), ``old`` / ``new`` (class names; ``new``
    is None when skipped), ``change`` (one of fused / exact / approximate / skipped), ``reason``,
    and ``max_rel_error`` (of the probe check, when one ran)."""

    def __init__(self, model_class: str, target: str, entries=(), note: Optional[str] = None, dry_run: bool = False):
        super().__init__(entries)
        self.model_class = model_class
        self.target = target
        self.note = note
        self.dry_run = dry_run
        # target="rmsnorm" only: {"writers", "runtime_centring"} and the probe verification
        self.conversion: Optional[dict] = None
        self.verification: Optional[dict] = None

    def add(self, name: str, old: str, new: Optional[str], change: str, reason: str, max_rel_error: Optional[float] = None):
        assert change in CHANGES, change
        self.append({"name": name, "old": old, "new": new, "change": change, "reason": reason, "max_rel_error": max_rel_error})

    def count(self, change: str) -> int:  # type: ignore[override]
        return sum(1 for e in self if e["change"] == change)

    @property
    def changed(self) -> list:
        return [e for e in self if e["change"] != SKIPPED]

    @property
    def skipped(self) -> list:
        return [e for e in self if e["change"] == SKIPPED]

    def summary(self) -> str:
        counts = ", ".join(f"{self.count(c)} {c}" for c in CHANGES)
        verb = "would change" if self.dry_run else "changed"
        return f"hf_rmsnorm: {self.model_class}, target={self.target}: {counts} ({verb} {len(self.changed)} of {len(self)} norm modules)"

    def __str__(self) -> str:
        lines = [self.summary()]
        if self.note:
            lines.append(self.note)
        if not self:
            return "\n".join(lines)
        # modules left out by include/exclude are kept in the list but summed up in the table
        unselected = [e for e in self if e["reason"] == NOT_SELECTED]
        rows = [("module", "old → new", "change", "reason")]
        for e in self:
            if e["reason"] == NOT_SELECTED:
                continue
            err = "" if e["max_rel_error"] is None else f" [probe max rel err {e['max_rel_error']:.1e}]"
            rows.append((e["name"], f"{e['old']} → {e['new'] or '(unchanged)'}", e["change"], e["reason"] + err))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
            if i == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
        if unselected:
            lines.append(f"({len(unselected)} more norm modules {NOT_SELECTED}, e.g. {unselected[0]['name']})")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<PatchReport {self.summary()}>"
