"""What the prune and factorize reports share: cost ratios, JSON round trip, the summary and the table.

The fields stay on each report's dataclass (the JSON keys keep their order and each format its version);
a subclass names its format (``FORMAT``, ``VERSION``, ``WHAT``) and its per-item list (``ITEMS``: the field
and the item dataclass).
"""
from __future__ import annotations

import dataclasses
import json
from typing import ClassVar, List, Sequence, Tuple


class ModelReport:
    """Mixin of :class:`PruneReport` and :class:`FactorizeReport` (dataclasses with ``params_*``, ``flops_*``,
    ``budget``, ``forward_passes``, ``time_s``)."""

    FORMAT: ClassVar[str]
    VERSION: ClassVar[int]
    WHAT: ClassVar[str]  # "prune" or "factorize", in messages
    ITEMS: ClassVar[Tuple[str, type]]

    @property
    def params_ratio(self) -> float:
        """params_after / params_before."""
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def flops_ratio(self) -> float:
        """flops_after / flops_before."""
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    def to_dict(self) -> dict:
        """Plain dict (JSON types only) with ``format`` and ``version`` keys added."""
        return {"format": self.FORMAT, "version": self.VERSION, **dataclasses.asdict(self)}

    def to_json(self, **kwargs) -> str:
        """JSON text of :meth:`to_dict` (``kwargs`` go to ``json.dumps``, default ``indent=2``)."""
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict):
        """Inverse of :meth:`to_dict` (also accepts ``json.loads(report.to_json())``)."""
        if data.get("format") != cls.FORMAT:
            raise ValueError(f"not an lsprune.torch {cls.WHAT} report")
        if data.get("version") != cls.VERSION:
            raise ValueError(f"{cls.WHAT} report version {data.get('version')}; this lsprune reads {cls.VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        field, item = cls.ITEMS
        kw[field] = [item(**r) for r in data.get(field, [])]
        return cls(**kw)

    def _costs_line(self) -> str:
        return (f"params {si(self.params_before)} -> {si(self.params_after)} ({self.params_ratio:.1%}), "
                f"MACs/sample {si(self.flops_before)} -> {si(self.flops_after)} ({self.flops_ratio:.1%}); "
                f"{self.forward_passes:.2f} forward passes, {self.time_s:.2f}s")

    def _budget_line(self) -> str:
        if not self.budget:
            return ""
        b = self.budget
        return (f"\nbudget ({b['allocation']}): {b['kind']} {b['target']:.4g} asked, {b['reached']:.4g} reached "
                f"(reachable [{b['reachable'][0]:.4g}, 1])")


def table(rows: List[Sequence[str]]) -> str:
    """Left-aligned plain-text columns, a rule under the header row."""
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(f"{c:<{w[i]}}" for i, c in enumerate(r)).rstrip() for r in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def si(v: float) -> str:
    """A count with a k/M/G suffix, 3 significant digits."""
    for unit, s in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= unit:
            return f"{v / unit:.3g}{s}"
    return f"{v:.0f}"
