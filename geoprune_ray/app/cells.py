"""The cells of ``geoprune evidence``'s tables: a value over seeds as mean ± sample std, shared by ``app.evidence``
(the arms over seeds) and ``app.allocations`` (the allocations at fixed compressions)."""

from __future__ import annotations

import math
import statistics
from typing import Any, Optional, Sequence


def stats(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample std of the measured values (None and NaN left out); std is None for one value."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def pm(values: Sequence[Optional[float]], digits: int = 2) -> str:
    """``mean ± std`` (just the mean for one value, ``n/a`` for none)."""
    mean, std = stats(values)
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def measured_cells(arms: Sequence[dict[str, Any]]) -> str:
    """The last cells of an arm's row over seeds: ΔG before fine-tune, top-1 before and after fine-tune."""
    return (f"{pm([a['delta_g'] for a in arms], 4)} | {pm([a['top1_before_finetune'] for a in arms])} | "
            f"{pm([a['top1'] for a in arms])} |")
