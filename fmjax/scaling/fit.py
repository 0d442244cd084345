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

  python -m fmjax.scaling fit TABLE --out DIR [--n_column params]

A table is JSONL or CSV with a row per run; `load_points` reads it as is,
finding the columns of N, D, the loss and (optionally) C by their common names
(COLUMN_NAMES), or by the names given.
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
import tqdm
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

# Column names each quantity goes by, in order of preference, compared without case,
# spaces or punctuation ("Model Size" is modelsize). fmjax's own records come first
# (records.jsonl: params, tokens, final_eval_loss, flops); then common names of
# published tables.
COLUMN_NAMES = {
    "N": ("params", "N", "parameters", "n_params", "num_params", "num_parameters",
          "model_size", "model_params", "size", "non_embedding_params", "active_params"),
    "D": ("tokens", "D", "n_tokens", "num_tokens", "training_tokens", "train_tokens", "data",
          "data_size", "dataset_size"),
    "loss": ("final_eval_loss", "eval_loss", "val_loss", "validation_loss", "valid_loss",
             "test_loss", "loss", "L", "final_loss", "best_eval_loss"),
    "C": ("flops", "C", "compute", "training_flops", "training_flop", "train_flops", "flop"),
}
WHAT = {"N": "model-size (N)", "D": "training-tokens (D)", "loss": "loss",
        "C": "training-compute (C)"}


class ColumnError(ValueError):
  """The table lacks a column the fit needs (`role`: N, D or loss), or one that was named
  (`given`)."""

  def __init__(self, message: str, role: str, given: str | None = None):
    super().__init__(message)
    self.role, self.given = role, given


@dataclasses.dataclass
class Points:
  """The points of a table, and the column each quantity was read from."""
  rows: list
  N: np.ndarray
  D: np.ndarray
  L: np.ndarray
  C: np.ndarray
  columns: dict  # role (N, D, loss, C) -> column name; C is None for C = 6 N D


def load_table(path: str) -> list[dict]:
  """Rows of a JSONL or CSV file (numbers parsed) as dicts."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"records file {path} does not exist; run a sweep first "
                            "(python -m fmjax.sweep) or pass another table")
  if os.path.isdir(path):
    raise FileNotFoundError(f"{path} is a directory; give its records.jsonl, or another "
                            "table (JSONL or CSV)")
  with open(path, newline="") as f:
    if path.endswith(".csv"):
      return [{k.strip(): _number(v) for k, v in row.items() if k is not None}
              for row in csv.DictReader(f)]
    rows = []
    for i, line in enumerate(f, 1):
      if line.strip():
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{i} is not valid JSON ({e.msg}); fix or delete that line") from None
        if not isinstance(row, dict):
          raise ValueError(f"{path}:{i} is not a JSON object; each line is one run's record")
        rows.append(row)
    return rows


def _number(v):
  if isinstance(v, str) and not v.strip():
    return None  # an empty CSV cell
  try:
    return float(v)
  except (TypeError, ValueError):
    return v


def _key(name: str) -> str:
  return "".join(ch for ch in name.lower() if ch.isalnum())


def find_columns(rows: list[dict], n: str | None = None, d: str | None = None,
                 loss: str | None = None, c: str | None = None, where: str = "the table") -> dict:
  """The column of each quantity: the one named, else the first of COLUMN_NAMES[role]
  the table has. C may be absent (then None: C = 6 N D); c='' asks for 6 N D."""
  if not rows:
    raise ValueError(f"{where} has no rows; nothing to fit")
  present = list(dict.fromkeys(k for r in rows for k in r))
  by_key = {}
  for name in present:
    by_key.setdefault(_key(name), name)
  found = {}
  for role, given in (("N", n), ("D", d), ("loss", loss), ("C", c)):
    if given == "" and role == "C":
      found[role] = None
    elif given is not None:
      if given not in present:
        raise ColumnError(f"{where} has no column {given!r} (named for {WHAT[role]}); its "
                          f"columns are {', '.join(present)}", role, given)
      found[role] = given
    else:
      found[role] = next((by_key[_key(k)] for k in COLUMN_NAMES[role] if _key(k) in by_key),
                         None)
      if found[role] is None and role != "C":
        raise ColumnError(f"{where} has no {WHAT[role]} column: none of "
                          f"{', '.join(COLUMN_NAMES[role])}; its columns are "
                          f"{', '.join(present)}", role)
  return found


def columns(rows: list[dict], n: str | None = None, d: str | None = None,
            loss: str | None = None, c: str | None = None, where: str = "the table"):
  """(N, D, L, C) float64 arrays from table rows, from the columns `find_columns` picks;
  C is 6 N D when the table has no compute column (or c='')."""
  p = points(rows, n, d, loss, c, where)
  return p.N, p.D, p.L, p.C


def points(rows: list[dict], n=None, d=None, loss=None, c=None, where="the table") -> Points:
  """The table's points as a `Points`; ValueError naming the row and column of a bad value."""
  found = find_columns(rows, n, d, loss, c, where)
  values = {}
  for role, name in found.items():
    if name is None:
      continue
    x = np.empty(len(rows), np.float64)
    for i, r in enumerate(rows):
      v = r.get(name)
      if v is None:
        raise ValueError(f"row {i} of {where} has no {name!r} value ({WHAT[role]}); fill it "
                         "in or delete the row")
      try:
        x[i] = float(v)
      except (TypeError, ValueError):
        raise ValueError(f"row {i} of {where}: {name}={v!r} is not a number "
                         f"({WHAT[role]})") from None
    values[role] = x
  N, D, L = values["N"], values["D"], values["loss"]
  C = values["C"] if found["C"] else 6 * N * D
  for role, x in (("N", N), ("D", D), ("loss", L), ("C", C)):
    if not np.all(np.isfinite(x)) or np.any(x <= 0):
      i = int(np.flatnonzero(~np.isfinite(x) | (x <= 0))[0])
      raise ValueError(f"row {i} of {where}: {found[role] or 'C = 6 N D'}={x[i]} must be a "
                       f"finite positive number ({WHAT[role]})")
  return Points(rows, N, D, L, C, found)


def load_points(path: str, n: str | None = None, d: str | None = None,
                loss: str | None = None, c: str | None = None) -> Points:
  """A table file (JSONL or CSV) read as is: `load_table`, then `points`."""
  return points(load_table(path), n, d, loss, c, where=path)


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


def _progress(iterable, desc: str, show: bool, total: int | None = None):
  """`iterable` with a progress bar on stderr when `show` (a fit can take minutes)."""
  return tqdm.tqdm(iterable, desc=desc, total=total, disable=not show, file=sys.stderr,
                   leave=False)


def _to_fit(theta, objective) -> ParametricFit:
  a, b, e, alpha, beta = theta
  return ParametricFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha),
                       beta=float(beta), objective=float(objective))


def fit_parametric(N, D, L, delta: float = 1e-3, grid: dict | None = None,
                   refine: int = DEFAULT_REFINE, bootstrap: int = 0, confidence: float = 0.9,
                   seed: int = 0, progress: bool = False) -> ParametricFit:
  """Chinchilla's Approach 3 fit; `bootstrap` > 0 adds percentile intervals.

  L-BFGS runs from the `refine` grid points with the lowest objective (every
  grid point when refine >= the grid's size). `progress` shows the starts and
  the bootstrap resamples on stderr.
  """
  logN, logD, logL = np.log(N), np.log(D), np.log(L)
  if len(logL) < 5:
    raise ValueError(f"{len(logL)} points cannot determine the 5 parameters of L(N, D); "
                     "run more sweep members")
  starts = _grid_starts(grid or DEFAULT_GRID)
  best_starts = _best_starts(starts, logN, logD, logL, delta, refine)
  best = _minimise(_progress(best_starts, "L(N, D) from each start", progress), logN, logD,
                   logL, delta)
  fit = _to_fit(best.x, best.fun)
  if bootstrap:
    rng = np.random.default_rng(seed)
    fits = [refit(fit, N, D, L, rng.integers(0, len(logL), len(logL)), delta, grid)
            for _ in _progress(range(bootstrap), "bootstrap resamples", progress)]
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


def compute_optimal(fit: ParametricFit, C, per_token=(6.0, 1.0)):
  """N_opt, D_opt and tokens per parameter minimising fit.predict under C = c N^p D.

  `per_token` = (c, p): the training FLOPs per token of a model of N parameters,
  c N^p; Chinchilla's 6 N by default. Setting dL/dN = 0 along the budget,
  N_opt = (alpha A C^beta / (p beta B c^beta))^(1 / (alpha + p beta)).
  """
  c, p = per_token
  C = np.asarray(C, np.float64)
  with np.errstate(divide="ignore"):  # a degenerate refit (A or B = 0): N or D infinite
    N = (fit.alpha * fit.A * C**fit.beta / (p * fit.beta * fit.B * c**fit.beta)) ** (
        1 / (fit.alpha + p * fit.beta))
    D = C / (c * N**p)
  return {"N": N, "D": D, "tokens_per_param": D / N, "loss": fit.predict(N, D)}


def flops_per_token_law(N, D, C) -> tuple[float, float]:
  """(c, p) of FLOPs per token = c N^p, least squares in log space over runs of N
  parameters trained on D tokens for C FLOPs (a sweep's own FLOP count)."""
  per_token = np.asarray(C, np.float64) / D
  if len(np.unique(N)) < 2:  # one size: no exponent to fit, proportional to N
    return float(np.exp(np.mean(np.log(per_token / N)))), 1.0
  p, log_c = np.polyfit(np.log(N), np.log(per_token), 1)
  return float(np.exp(log_c)), float(p)


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


def fit_compute(C, L, delta: float = 1e-3, start: ComputeFit | None = None) -> ComputeFit:
  """L(C) = E + A/C^gamma by the same Huber-in-log-space method, on points (C, L); from
  `start` alone if given (a bootstrap refit near the full fit), else from a grid."""
  logC, logL = np.log(C), np.log(L)
  ones = np.zeros_like(logC)

  def objective(theta):  # the two-term case of the parametric objective
    a, e, gamma = theta
    value, g = _parametric_objective(np.array([a, -1e3, e, gamma, 0.0]), logC, ones, logL, delta)
    return value, g[[0, 2, 3]]

  starts = ([(math.log(start.A), math.log(start.E), start.gamma)] if start is not None else
            itertools.product((0.0, 5.0, 10.0, 20.0), (-1.0, 0.0, 1.0), (0.05, 0.2, 0.5)))
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
                         full: ParametricFit | None = None, progress: bool = False) -> dict:
  """Refit without each budget and predict its runs: mean |relative error| per budget."""
  labels = group_budgets(C)
  full = full or fit_parametric(N, D, L, delta=delta, grid=grid)
  per_budget = []
  for k in _progress(np.unique(labels), "leave-one-budget-out refits", progress):
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
            predict_at=(), progress: bool = False) -> dict:
  """Every fit the table supports, as one JSON-ready dict; `progress` shows the slow
  parts (the fit's starts, the bootstrap, the leave-one-budget-out refits) on stderr."""
  out = {"points": int(len(L))}
  par = fit_parametric(N, D, L, delta=delta, bootstrap=bootstrap, seed=seed, progress=progress)
  out["parametric"] = par.as_dict()
  out["goodness"] = goodness(par, N, D, L)
  out["leave_one_budget_out"] = leave_one_budget_out(N, D, L, C, delta=delta, full=par,
                                                     progress=progress)
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


def fit_points(points: Points, delta: float = 1e-3, bootstrap: int = 100, seed: int = 0,
               predict_at=(), progress: bool = False) -> dict:
  """`fit_all` on a table's points, with the columns it read and, when every row
  declares the data's entropy, the fitted E compared with it."""
  out = fit_all(points.N, points.D, points.L, points.C, delta=delta, bootstrap=bootstrap,
                seed=seed, predict_at=predict_at, progress=progress)
  out["columns"] = dict(points.columns)
  entropy = known_entropy(points.rows)
  if entropy is not None:
    out["entropy"] = compare_entropy(out["parametric"], entropy)
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
