"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

With n samples per problem of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the chance that at
least one of k samples drawn without replacement from the n passes. The ratio of binomials is
computed as the product prod_{i=n-c+1}^{n} (1 - k/i), which never forms a huge binomial and stays
accurate for large n.
"""

from __future__ import annotations

from typing import Iterable


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k for one problem with n samples, c of them correct."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"pass_at_k: n, c, k must be integers, got n={n!r}, c={c!r}, k={k!r}")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k: expected n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: expected 1 <= k <= n={n}, got k={k}")
    if n - c < k:
        return 1.0  # every draw of k samples contains a correct one
    ratio = 1.0
    for i in range(n - c + 1, n + 1):
        ratio *= 1.0 - k / i
    return 1.0 - ratio


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given as (n, c) pairs; problems with fewer than k samples are an error."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    if not values:
        raise ValueError("mean_pass_at_k: no problems given")
    return sum(values) / len(values)
