"""Paired statistics of a study: Student-t confidence intervals without SciPy.

Within a seed every arm shares its initial weights, data order and noise, so the quantity that
carries the evidence is the per-seed difference ``arm - baseline``; its mean and a two-sided
Student-t interval over the seeds are what the tables report.
"""

import dataclasses
import math
from collections.abc import Sequence


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int | float) -> float:  # noqa: PYI041 (beartype: an int is not a float)
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: int | float) -> float:  # noqa: PYI041
    """The `p` quantile of Student's t (bisection on `t_cdf`, to 1e-12)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile(p={p}, df={df}): expected 0 < p < 1 and df > 0")
    low, high = -1e3, 1e3
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12:
            break
    return 0.5 * (low + high)


@dataclasses.dataclass(frozen=True)
class Paired:
    """Summary of the per-seed differences ``arm - baseline``."""

    n: int
    mean: float
    std: float
    """Sample standard deviation of the differences (n - 1 in the denominator)."""
    low: float
    """Lower end of the two-sided Student-t confidence interval of the mean difference."""
    high: float
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for fewer than two values)."""
    n = len(values)
    mean = sum(values) / n if n else math.nan
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def paired_interval(arm: Sequence[float], baseline: Sequence[float], level: float = 0.95) -> Paired:
    """Mean of ``arm[i] - baseline[i]`` over seeds with its two-sided Student-t interval.

    **Arguments:**

    - `arm`, `baseline`: one value per seed, in the same seed order.
    - `level`: coverage of the interval.

    **Returns:** a `Paired`; with one seed the interval is (nan, nan).
    """
    if len(arm) != len(baseline):
        raise ValueError(f"paired_interval: {len(arm)} arm values for {len(baseline)} baseline values")
    differences = [a - b for a, b in zip(arm, baseline)]
    n = len(differences)
    mean, std = mean_std(differences)
    if n < 2:
        return Paired(n, mean, std, math.nan, math.nan, level)
    half = t_quantile(0.5 + level / 2.0, n - 1) * std / math.sqrt(n)
    return Paired(n, mean, std, mean - half, mean + half, level)
