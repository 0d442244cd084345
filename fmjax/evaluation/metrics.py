"""The numbers of an evaluation: pass@k, calibration error, and standard errors."""

from __future__ import annotations

import math

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
  """The unbiased estimate of pass@k from n samples of which c are correct:
  1 - C(n - c, k) / C(n, k), the chance that k drawn without replacement hold a
  correct one (Chen et al. 2021), computed as a stable product."""
  if not 1 <= k <= n:
    raise ValueError(f"pass@{k} needs 1 <= k <= n, the samples per problem (n={n})")
  if not 0 <= c <= n:
    raise ValueError(f"c={c} correct of n={n} samples")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_and_stderr(values) -> tuple[float, float]:
  """The mean and its standard error (sample standard deviation / sqrt(n); 0 for n < 2)."""
  x = np.asarray(values, np.float64)
  if not x.size:
    return float("nan"), float("nan")
  se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0
  return float(x.mean()), se


def ratio_and_stderr(numerators, denominators) -> tuple[float, float]:
  """sum(numerators) / sum(denominators) and its standard error over the items (delta
  method): for a loss per token over documents of different lengths."""
  a, b = np.asarray(numerators, np.float64), np.asarray(denominators, np.float64)
  r = float(a.sum() / b.sum())
  n = a.size
  if n < 2:
    return r, 0.0
  return r, float(math.sqrt(n / (n - 1) * ((a - r * b) ** 2).sum()) / b.sum())


def calibration_bins(confidence, correct, bins: int = 10) -> list[dict]:
  """Equal-width confidence bins over [0, 1]: for each, the count, the mean confidence
  and the accuracy (None where empty). Bin j holds confidences in (j/M, (j+1)/M],
  the first also 0."""
  conf, right = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
  which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
  out = []
  for j in range(bins):
    inside = which == j
    n = int(inside.sum())
    out.append({"low": j / bins, "high": (j + 1) / bins, "count": n,
                "confidence": float(conf[inside].mean()) if n else None,
                "accuracy": float(right[inside].mean()) if n else None})
  return out


def expected_calibration_error(confidence, correct, bins: int = 10) -> float:
  """ECE: sum over bins of |bin| / n * |accuracy - mean confidence|."""
  total = len(confidence)
  return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"])
                   for b in calibration_bins(confidence, correct, bins) if b["count"]))
