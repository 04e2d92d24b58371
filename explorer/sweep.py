"""Sweeps: a criterion x amount grid of plans from one statistics pass, each previewed, as the curve of perplexity
against size that every pruning paper draws.

One statistics pass serves every point: drop by each criterion at several fractions, merge to several counts,
slim to several widths, quantise to several bit widths. Each point is a preview (no copy of the model) with its
standard error, and its change against the original paired block by block; the rows go to a CSV and the figure
(``explorer.figures.sweep_figure``) draws one line per series with error bars. The CLI (``explorer sweep``), the
session (``Session.sweep``: the app's button and the notebooks) share this grid.
"""
from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from .errors import PlanError
from .moe import MoEModel
from .perplexity import change
from .plan import Plan
from .stats import RouterStats

OPERATIONS = ("drop", "merge", "slim", "quantise")
CRITERIA = ("reap", "frequency", "random")
DROP_FRACTIONS = (0.125, 0.25, 0.375, 0.5)
SLIM_KEEPS = (0.75, 0.5, 0.25)
QUANTISE_BITS = (8, 4, 3, 2)


@dataclass
class SweepPoint:
    series: str  # e.g. "drop (reap)": one line of the figure
    amount: float  # the share removed (drop, merge, slim) or the bit width (quantise)
    plan: str  # the plan in words
    params: int
    bytes: int
    ppl: float
    ppl_se: float
    change: float  # against the original, paired over the same blocks
    change_se: float
    within_noise: bool
    seconds: float

    def to_row(self) -> dict:
        return asdict(self)


def sweep_plans(stats: RouterStats, view: MoEModel, operations: Iterable[str] = OPERATIONS,
                criteria: Iterable[str] = CRITERIA, fractions: Iterable[float] = DROP_FRACTIONS,
                keeps: Iterable[float] = SLIM_KEEPS, bits: Iterable[int] = QUANTISE_BITS) -> list[tuple[str, float, Plan]]:
    """(series, amount, plan) for every point of the grid; a point the model cannot take (fewer experts than top-k,
    a width the layout cannot hold) is left out, never guessed."""
    from . import planners

    operations = list(operations)
    bad = sorted(set(operations) - set(OPERATIONS))
    if bad:
        raise PlanError(f"sweep: unknown operation(s) {', '.join(bad)}; choose from {', '.join(OPERATIONS)}")
    out = []

    def add(series: str, amount: float, make: Callable[[], Plan]) -> None:
        try:
            plan = make()
            plan.validate(view)
        except PlanError:
            return
        if not plan.is_empty() and all(p.to_dict() != plan.to_dict() for _, _, p in out):
            out.append((series, amount, plan))

    E = min(view.num_experts)
    for op in operations:
        if op == "drop":
            for c in criteria:
                for f in fractions:
                    add(f"drop ({c})", f, lambda c=c, f=f: planners.drop_experts(stats, f, c, view=view))
        elif op == "merge":
            for f in fractions:
                to = E - max(1, round(E * f))
                add("merge (mc-smoe)", 1 - to / E, lambda to=to: planners.merge_experts(stats, to, "mc-smoe"))
        elif op == "slim":
            for k in keeps:
                add("slim", 1 - k, lambda k=k: planners.slim_experts(stats, k))
        else:
            for b in bits:
                add("quantise", float(b), lambda b=b: planners.quantise_plan(stats, view, bits=b, group_size=32))
    return out


def run_sweep(model, view: MoEModel, stats: RouterStats, blocks, plans: list[tuple[str, float, Plan]],
              base=None, progress: Callable[[int, int, str], None] | None = None) -> list[SweepPoint]:
    """The original (first) and every plan previewed on ``blocks``; ``base`` is the original's perplexity on the
    same blocks (measured if None). ``progress(i, n, plan)`` is called before each point."""
    from .perplexity import perplexity
    from .preview import preview_perplexity

    if base is None:
        base = perplexity(model, blocks)
    rep0 = Plan().report(view)
    points = [SweepPoint("original", 0.0, "", rep0["params_before"], rep0["bytes_before"], base.ppl, base.se, 0.0,
                         0.0, True, 0.0)]
    for i, (series, amount, plan) in enumerate(plans):
        if progress is not None:
            progress(i, len(plans), plan.describe())
        t = time.perf_counter()
        res = preview_perplexity(model, view, plan, blocks, stats=stats)
        rep = plan.report(view)
        c = change(base, res)
        points.append(SweepPoint(series, amount, plan.describe(), rep["params_after"], rep["bytes_after"], res.ppl,
                                 res.se, c.ratio, c.se, bool(c.noise), time.perf_counter() - t))
    return points


def csv_text(points: list[SweepPoint]) -> str:
    """The grid as CSV, one row per point (the original first)."""
    buf = io.StringIO()
    rows = [p.to_row() for p in points]
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_csv(points: list[SweepPoint], path: str | Path) -> Path:
    """``csv_text`` written all or nothing."""
    from .outputs import atomic_write

    atomic_write(path, csv_text(points))
    return Path(path)
