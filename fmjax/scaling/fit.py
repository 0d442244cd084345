"""Scaling-law fits: L(N, D), IsoFLOP profiles, L(C) and compute-optimal allocation.

The fits take any table of (N, D, loss), not only fmjax's own records, so
published results can be fitted the same way:

  * `fit_parametric`: Chinchilla's Approach 3, L(N, D) = E + A/N^alpha + B/D^beta.
    The model is fitted in log space, log L = LSE(a - alpha log N, b - beta log D, e)
    with A = e^a, B = e^b, E = e^e, by minimising a Huber loss (delta 1e-3) of the
    log-loss residuals with L-BFGS from every point of a grid of starts.
    `bootstrap` resamples the points to give confidence intervals.
  * `fit_isoflop`: Approach 2. For each FLOP budget a parabola in log N gives the
    loss-optimal N*; power laws N*(C) = k_N C^a and D*(C) = k_D C^b follow.
  * `fit_compute`: L(C) = E + A / C^gamma over the best run of each budget.
  * `compute_optimal`: N_opt(C), D_opt(C) and tokens per parameter implied by a
    parametric fit, with C = 6 N D.

  python -m fmjax.scaling fit RECORDS.jsonl --out DIR [--n_column params]
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import sys

import numpy as np
from scipy import optimize

PARAMETRIC_NAMES = ("E", "A", "B", "alpha", "beta")
# Starts for L-BFGS, in (a, b, e, alpha, beta) with A = e^a, B = e^b, E = e^e:
# Chinchilla's grid. One start alone often lands in a local minimum with the
# wrong split between the N and D terms. The objective is evaluated at every
# grid point at once, and L-BFGS runs from the `refine` best of them.
DEFAULT_GRID = dict(a=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0), b=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
                    e=(-1.0, -0.5, 0.0, 0.5, 1.0), alpha=(0.0, 0.5, 1.0, 1.5, 2.0),
                    beta=(0.0, 0.5, 1.0, 1.5, 2.0))
DEFAULT_REFINE = 16
# The Huber objective is tiny (residuals ~1e-2, delta 1e-3), so scipy's default
# stopping tolerances end L-BFGS far from the optimum.
LBFGS_OPTIONS = dict(gtol=1e-12, ftol=1e-15, maxiter=5000)
# Box for (a, b, e, alpha, beta): losses fall with N and D (alpha, beta >= 0), and
# A, B, E stay finite. Resamples of a few points otherwise drift off to A = e^800.
BOUNDS = ((-30.0, 300.0), (-30.0, 300.0), (-30.0, 5.0), (0.0, 10.0), (0.0, 10.0))


# ---------------------------------------------------------------------------
# Tables


def load_table(path: str) -> list[dict]:
  """Rows of a JSONL or CSV file (numbers parsed) as dicts."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"records file {path} does not exist; run a sweep first "
                            "(python -m fmjax.sweep) or pass another table")
  with open(path) as f:
    if path.endswith(".csv"):
      return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    rows = []
    for i, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{i} is not valid JSON ({e.msg}); fix or delete that line") from None
    return rows


def _number(v):
  try:
    return float(v)
  except (TypeError, ValueError):
    return v


def columns(rows: list[dict], n: str = "N", d: str = "D", loss: str = "loss",
            c: str | None = None):
  """(N, D, L, C) float64 arrays from table rows; C is 6 N D unless column `c` is given."""
  if not rows:
    raise ValueError("the table has no rows; nothing to fit")
  for key in (n, d, loss) + ((c,) if c else ()):
    missing = [i for i, r in enumerate(rows) if r.get(key) is None]
    if missing:
      raise ValueError(f"row {missing[0]} has no {key!r} column; columns are "
                       f"{sorted(rows[missing[0]])}; pick the right one with --n_column/--loss_column")
  N, D, L = (np.array([r[k] for r in rows], np.float64) for k in (n, d, loss))
  C = np.array([r[c] for r in rows], np.float64) if c else 6 * N * D
  for name, x in (("N", N), ("D", D), ("loss", L), ("C", C)):
    if not np.all(np.isfinite(x)) or np.any(x <= 0):
      i = int(np.flatnonzero(~np.isfinite(x) | (x <= 0))[0])
      raise ValueError(f"row {i}: {name}={x[i]} must be a finite positive number")
  return N, D, L, C


# ---------------------------------------------------------------------------
# Parametric fit L(N, D) = E + A / N^alpha + B / D^beta


@dataclasses.dataclass
class ParametricFit:
  E: float
  A: float
  B: float
  alpha: float
  beta: float
  objective: float  # the minimised Huber sum
  intervals: dict = dataclasses.field(default_factory=dict)  # name -> (lo, hi)

  def predict(self, N, D):
    return self.E + self.A / np.asarray(N, np.float64) ** self.alpha + \
        self.B / np.asarray(D, np.float64) ** self.beta

  def as_dict(self):
    return {k: getattr(self, k) for k in PARAMETRIC_NAMES + ("objective",)} | {
        "intervals": {k: list(v) for k, v in self.intervals.items()}}


def huber(r, delta):
  a = np.abs(r)
  return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _parametric_objective(theta, logN, logD, logL, delta):
  """Huber sum of log-space residuals and its gradient in (a, b, e, alpha, beta)."""
  a, b, e, alpha, beta = theta
  terms = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])
  top = terms.max(axis=0)
  w = np.exp(terms - top)
  total = w.sum(axis=0)
  r = top + np.log(total) - logL
  w = w / total  # d lse / d term
  dr = np.clip(r, -delta, delta)  # Huber derivative
  grad = np.array([np.sum(dr * w[0]), np.sum(dr * w[1]), np.sum(dr * w[2]),
                   -np.sum(dr * w[0] * logN), -np.sum(dr * w[1] * logD)])
  return float(huber(r, delta).sum()), grad


def _grid_starts(grid: dict) -> np.ndarray:
  return np.array(list(itertools.product(
      grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"])), np.float64)


def _best_starts(starts, logN, logD, logL, delta, k):
  """The k starts with the lowest objective, evaluated for all starts at once."""
  a, b, e, alpha, beta = (starts[:, i:i + 1] for i in range(5))
  terms = np.stack([a - alpha * logN, b - beta * logD, np.broadcast_to(e, (len(starts), len(logN)))])
  r = np.logaddexp(np.logaddexp(terms[0], terms[1]), terms[2]) - logL
  values = huber(r, delta).sum(axis=1)
  return starts[np.argsort(values, kind="stable")[:k]]


def _minimise(starts, logN, logD, logL, delta):
  """The best L-BFGS result from `starts` (the first of equals), clipped into BOUNDS."""
  lo, hi = np.array(BOUNDS).T
  return min((optimize.minimize(_parametric_objective, np.clip(x0, lo, hi),
                                args=(logN, logD, logL, delta), jac=True, method="L-BFGS-B",
                                bounds=BOUNDS, options=LBFGS_OPTIONS) for x0 in starts),
             key=lambda res: res.fun)


def _to_fit(theta, objective) -> ParametricFit:
  a, b, e, alpha, beta = theta
  return ParametricFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha),
                       beta=float(beta), objective=float(objective))


def fit_parametric(N, D, L, delta: float = 1e-3, grid: dict | None = None,
                   refine: int = DEFAULT_REFINE, bootstrap: int = 0, confidence: float = 0.9,
                   seed: int = 0) -> ParametricFit:
  """Chinchilla's Approach 3 fit; `bootstrap` > 0 adds percentile intervals.

  L-BFGS runs from the `refine` grid points with the lowest objective (every
  grid point when refine >= the grid's size).
  """
  logN, logD, logL = np.log(N), np.log(D), np.log(L)
  if len(logL) < 5:
    raise ValueError(f"{len(logL)} points cannot determine the 5 parameters of L(N, D); "
                     "run more sweep members")
  starts = _grid_starts(grid or DEFAULT_GRID)
  best = _minimise(_best_starts(starts, logN, logD, logL, delta, refine), logN, logD, logL, delta)
  fit = _to_fit(best.x, best.fun)
  if bootstrap:
    rng = np.random.default_rng(seed)
    fits = [refit(fit, N, D, L, rng.integers(0, len(logL), len(logL)), delta, grid)
            for _ in range(bootstrap)]
    samples = [[getattr(f, k) for k in PARAMETRIC_NAMES] for f in fits]
    lo, hi = np.quantile(np.array(samples), [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    fit.intervals = {k: (float(l), float(h)) for k, l, h in zip(PARAMETRIC_NAMES, lo, hi)}
  return fit


def refit(fit: ParametricFit, N, D, L, rows, delta: float = 1e-3,
          grid: dict | None = None) -> ParametricFit:
  """The fit on a subset or resample `rows` of the points, started from `fit`'s
  optimum and the subset's two best grid points: cheap, for bootstraps and
  leave-one-out refits."""
  logN, logD, logL = np.log(N[rows]), np.log(D[rows]), np.log(L[rows])
  x = np.array([math.log(fit.A), math.log(fit.B), math.log(fit.E), fit.alpha, fit.beta])
  starts = _best_starts(_grid_starts(grid or DEFAULT_GRID), logN, logD, logL, delta, 2)
  res = _minimise(np.concatenate([x[None], starts]), logN, logD, logL, delta)
  return _to_fit(res.x, res.fun)


def compute_optimal(fit: ParametricFit, C):
  """N_opt, D_opt and tokens per parameter minimising fit.predict under C = 6 N D."""
  C = np.asarray(C, np.float64)
  a, b = fit.beta / (fit.alpha + fit.beta), fit.alpha / (fit.alpha + fit.beta)
  G = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1 / (fit.alpha + fit.beta))
  N = G * (C / 6) ** a
  D = (C / 6) / N
  return {"N": N, "D": D, "tokens_per_param": D / N, "loss": fit.predict(N, D)}


# ---------------------------------------------------------------------------
# IsoFLOP profiles


@dataclasses.dataclass
class IsoFLOPFit:
  budgets: list  # one dict per budget: C, N_opt, D_opt, loss_opt, parabola (in log N)
  N_exponent: float  # N*(C) = N_coefficient * C^N_exponent
  N_coefficient: float
  D_exponent: float
  D_coefficient: float

  def as_dict(self):
    return dataclasses.asdict(self)


def group_budgets(C, rel_tol: float = 0.05):
  """Budget labels: runs whose C agree within rel_tol share a budget."""
  order = np.argsort(C)
  labels = np.empty(len(C), np.int64)
  current, anchor = -1, None
  for i in order:
    if anchor is None or C[i] > anchor * (1 + rel_tol):
      current, anchor = current + 1, C[i]
    labels[i] = current
  return labels


def fit_isoflop(N, D, L, C, budget=None) -> IsoFLOPFit:
  """Approach 2: a parabola of loss in log N per budget, then power laws in C."""
  labels = group_budgets(C) if budget is None else np.unique(budget, return_inverse=True)[1]
  budgets = []
  for k in np.unique(labels):
    sel = labels == k
    if sel.sum() < 3:
      raise ValueError(f"the budget near C={np.median(C[sel]):.3g} has {sel.sum()} runs; "
                       "an IsoFLOP parabola needs at least 3 sizes per budget")
    x = np.log(N[sel])
    c2, c1, c0 = np.polyfit(x, L[sel], 2)
    Cb = float(np.exp(np.mean(np.log(C[sel]))))
    if c2 <= 0:
      raise ValueError(f"the IsoFLOP curve at C={Cb:.3g} has no minimum (it is not convex "
                       "in log N); widen that budget's range of model sizes")
    x_opt = -c1 / (2 * c2)
    if not x.min() - 0.5 <= x_opt <= x.max() + 0.5:
      print(f"warning: the optimum at C={Cb:.3g} (N={math.exp(x_opt):.3g}) lies outside the "
            f"swept sizes {N[sel].min():.3g}..{N[sel].max():.3g}; extend the sweep",
            file=sys.stderr)
    n_opt = math.exp(x_opt)
    budgets.append({"C": Cb, "N_opt": n_opt, "D_opt": Cb / (6 * n_opt),
                    "loss_opt": float(c0 + c1 * x_opt + c2 * x_opt ** 2),
                    "parabola": [float(c2), float(c1), float(c0)]})
  if len(budgets) < 2:
    raise ValueError("an IsoFLOP fit needs at least 2 budgets to fit N*(C)")
  logC = np.log([b["C"] for b in budgets])
  aN, kN = np.polyfit(logC, np.log([b["N_opt"] for b in budgets]), 1)
  aD, kD = np.polyfit(logC, np.log([b["D_opt"] for b in budgets]), 1)
  return IsoFLOPFit(budgets, float(aN), float(math.exp(kN)), float(aD), float(math.exp(kD)))


# ---------------------------------------------------------------------------
# L(C) = E + A / C^gamma


@dataclasses.dataclass
class ComputeFit:
  E: float
  A: float
  gamma: float

  def predict(self, C):
    return self.E + self.A / np.asarray(C, np.float64) ** self.gamma

  def as_dict(self):
    return dataclasses.asdict(self)


def fit_compute(C, L, delta: float = 1e-3) -> ComputeFit:
  """L(C) = E + A/C^gamma by the same Huber-in-log-space method, on points (C, L)."""
  logC, logL = np.log(C), np.log(L)
  ones = np.zeros_like(logC)

  def objective(theta):  # the two-term case of the parametric objective
    a, e, gamma = theta
    value, g = _parametric_objective(np.array([a, -1e3, e, gamma, 0.0]), logC, ones, logL, delta)
    return value, g[[0, 2, 3]]

  starts = itertools.product((0.0, 5.0, 10.0, 20.0), (-1.0, 0.0, 1.0), (0.05, 0.2, 0.5))
  a, e, gamma = min((optimize.minimize(objective, np.array(x0), jac=True, method="L-BFGS-B",
                                       options=LBFGS_OPTIONS) for x0 in starts),
                    key=lambda res: res.fun).x
  return ComputeFit(E=math.exp(e), A=math.exp(a), gamma=float(gamma))


def frontier(C, L, labels=None):
  """The lowest loss of each budget: (C, L) arrays, sorted by C."""
  labels = group_budgets(C) if labels is None else labels
  best = [np.flatnonzero(labels == k)[np.argmin(L[labels == k])] for k in np.unique(labels)]
  best = sorted(best, key=lambda i: C[i])
  return C[best], L[best]


# ---------------------------------------------------------------------------
# Goodness of fit


def goodness(fit: ParametricFit, N, D, L) -> dict:
  """R^2 of log loss, RMSE of log residuals and mean absolute relative error."""
  pred = fit.predict(N, D)
  r = np.log(pred) - np.log(L)
  ss_tot = np.sum((np.log(L) - np.log(L).mean()) ** 2)
  return {"r2_log": float(1 - np.sum(r ** 2) / ss_tot) if ss_tot > 0 else float("nan"),
          "rmse_log": float(np.sqrt(np.mean(r ** 2))),
          "mean_abs_rel_error": float(np.mean(np.abs(pred - L) / L))}


def leave_one_budget_out(N, D, L, C, delta: float = 1e-3, grid: dict | None = None,
                         full: ParametricFit | None = None) -> dict:
  """Refit without each budget and predict its runs: mean |relative error| per budget."""
  labels = group_budgets(C)
  full = full or fit_parametric(N, D, L, delta=delta, grid=grid)
  per_budget = []
  for k in np.unique(labels):
    held = labels == k
    if (~held).sum() < 5:
      continue
    fit = refit(full, N, D, L, np.flatnonzero(~held), delta, grid)
    err = np.abs(fit.predict(N[held], D[held]) - L[held]) / L[held]
    per_budget.append({"C": float(np.exp(np.mean(np.log(C[held])))),
                       "mean_abs_rel_error": float(err.mean()),
                       "max_abs_rel_error": float(err.max())})
  mean = float(np.mean([b["mean_abs_rel_error"] for b in per_budget])) if per_budget else float("nan")
  return {"per_budget": per_budget, "mean_abs_rel_error": mean}


# ---------------------------------------------------------------------------
# Everything at once, for a records table


def fit_all(N, D, L, C, delta: float = 1e-3, bootstrap: int = 100, seed: int = 0,
            predict_at=()) -> dict:
  """Every fit the table supports, as one JSON-ready dict."""
  out = {"points": int(len(L))}
  par = fit_parametric(N, D, L, delta=delta, bootstrap=bootstrap, seed=seed)
  out["parametric"] = par.as_dict()
  out["goodness"] = goodness(par, N, D, L)
  out["leave_one_budget_out"] = leave_one_budget_out(N, D, L, C, delta=delta, full=par)
  out["identifiability"] = identifiability(out["parametric"], N, D)
  try:
    out["isoflop"] = fit_isoflop(N, D, L, C).as_dict()
  except ValueError as e:
    out["isoflop"] = {"skipped": str(e)}
  fC, fL = frontier(C, L)
  if len(fC) >= 3:
    out["compute"] = fit_compute(fC, fL, delta=delta).as_dict()
  targets = list(predict_at) or [float(C.max() * 10 ** k) for k in (0, 1, 2)]
  opt = compute_optimal(par, targets)
  out["compute_optimal"] = [
      {"C": c, "N": float(n), "D": float(d), "tokens_per_param": float(t), "loss": float(l)}
      for c, n, d, t, l in zip(targets, opt["N"], opt["D"], opt["tokens_per_param"], opt["loss"])]
  return out


# A power-law term that changes by less than this share of itself across the
# runs' sizes is indistinguishable from a constant, so E is not identified.
MIN_TERM_CHANGE = 0.1


def identifiability(fit: dict, N, D) -> dict:
  """Whether E is separated from the power-law terms by the runs' spread of N and D.

  A/N^alpha changes by 1 - (N_min/N_max)^alpha of itself across the runs;
  when alpha (or beta) is so small that this is under MIN_TERM_CHANGE, the
  term acts as a constant and trades off against E: the fit then cannot say
  what E is, only what the floor E + A/N^alpha is at the sizes it saw.
  """
  n_change = 1.0 - (float(np.min(N)) / float(np.max(N))) ** fit["alpha"]
  d_change = 1.0 - (float(np.min(D)) / float(np.max(D))) ** fit["beta"]
  return {"N_term_change": n_change, "D_term_change": d_change,
          "floor_at_largest_N": fit["E"] + fit["A"] / float(np.max(N)) ** fit["alpha"],
          "E_identified": bool(min(n_change, d_change) >= MIN_TERM_CHANGE)}


def known_entropy(rows: list[dict], column: str = "data_entropy_nats") -> float | None:
  """The irreducible loss the data itself declares, if every row gives the same one.

  Runs on a synthetic corpus record its exact entropy rate; a fitted E can
  then be checked against the truth. None when any row lacks it or rows disagree.
  """
  values = {r.get(column) for r in rows}
  return float(values.pop()) if len(values) == 1 and None not in values else None


def compare_entropy(fit: dict, entropy: float) -> dict:
  """The fitted E against the known entropy H: their gap and whether H is inside E's interval."""
  lo, hi = fit["intervals"].get("E", (float("nan"), float("nan")))
  return {"H": entropy, "E": fit["E"], "E_minus_H": fit["E"] - entropy,
          "relative_gap": (fit["E"] - entropy) / entropy, "H_in_interval": bool(lo <= entropy <= hi)}
