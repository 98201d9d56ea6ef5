"""95% intervals for what `surgery eval` measures, so a card or a table can follow the evidence rule: a difference
is claimed only where the interval of the paired difference excludes it.

- Perplexity: the eval segments are the unit (tokens within a segment are not independent), so the interval is a
  percentile bootstrap over segments of exp(Σ NLL / Σ tokens).
- Model against baseline on the same segments: the same bootstrap of the ratio of their perplexities, resampling
  segments in pairs.
- Greedy agreement: a bootstrap over segments of Σ hits / Σ tokens.
- Retrieval recall (one prompt = one trial): the Wilson score interval.
"""

import math
from collections.abc import Callable, Sequence

CONFIDENCE = 0.95
RESAMPLES = 2000


def bootstrap_interval(columns: Sequence[Sequence[float]], statistic: Callable[..., float], seed: int = 0
                       ) -> tuple[float, float]:
    """Percentile bootstrap of `statistic(*columns)` over paired units (one index across every column). A single
    unit has no spread to resample: the interval is the point."""
    from scipy.stats import bootstrap

    if len(columns[0]) < 2:
        value = statistic(*columns)
        return value, value
    result = bootstrap(tuple(list(column) for column in columns), statistic, paired=True, vectorized=False,
                       n_resamples=RESAMPLES, confidence_level=CONFIDENCE, method="percentile", random_state=seed)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def perplexity_of(nll: Sequence[float], tokens: Sequence[float]) -> float:
    return math.exp(sum(nll) / sum(tokens))


def perplexity_interval(nll: Sequence[float], tokens: Sequence[float]) -> tuple[float, float]:
    """nll[i], tokens[i]: the summed negative log-likelihood and the scored tokens of segment i."""
    return bootstrap_interval([nll, tokens], perplexity_of)


def perplexity_ratio_interval(nll: Sequence[float], base_nll: Sequence[float], tokens: Sequence[float]
                              ) -> tuple[float, float]:
    """The model's perplexity over the baseline's on the same segments, resampled in pairs."""
    return bootstrap_interval([nll, base_nll, tokens], lambda a, b, n: perplexity_of(a, n) / perplexity_of(b, n))


def share_interval(hits: Sequence[float], totals: Sequence[float]) -> tuple[float, float]:
    """Σ hits / Σ totals over segments (greedy agreement)."""
    return bootstrap_interval([hits, totals], lambda h, t: sum(h) / sum(t))


def wilson_interval(successes: int, trials: int) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95%)."""
    if trials == 0:
        return 0.0, 1.0
    z = 1.959963984540054
    share = successes / trials
    centre = (share + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def share_with_interval(share: float, trials: int) -> str:
    """A recall (one trial per prompt) and its Wilson interval, as tables print it: "40% (25%–57%)"."""
    if not trials:
        return f"{share:.0%}"
    low, high = wilson_interval(round(share * trials), trials)
    return f"{share:.0%} ({low:.0%}–{high:.0%})"


def verdict(interval: tuple[float, float], neutral: float = 1.0) -> str:
    """Whether an interval of a ratio (or difference) excludes `neutral`."""
    low, high = interval
    if high < neutral:
        return "lower"
    if low > neutral:
        return "higher"
    return "no difference at this sample size"
