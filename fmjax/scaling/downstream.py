"""Downstream scores against loss and compute: a sigmoid of loss, with bootstrap intervals.

Loss falls as a power law in compute; a benchmark score does not. It stays near
chance while the loss is high, then rises steeply over a narrow band of loss and
saturates. The usual two-step model (as in the task-scaling-law literature):

  score(L) = floor + (ceiling - floor) * sigmoid(k * (L0 - L))
  L(C)     = E + A / C^gamma                  (fmjax.scaling.fit.fit_compute)

fitted on a sweep's records, each of which carries the results of the suite
it ran in training (train.eval_suite: `suite` = {task: {"metrics": ...}}), or on
any table with a score column. Chaining the two predicts the score at a compute
budget no run reached. Intervals come from refitting both steps on bootstrap
resamples of the runs. The floor (chance: 0.25 for four choices) and the
ceiling can be fixed; with few runs they should be.

  python -m fmjax.scaling downstream RECORDS --metric=TASK/METRIC --out=DIR \
      [--predict C ...] [--floor F] [--ceiling F] [--bootstrap N]

writes DIR/downstream.json and DIR/downstream.png (the score against loss and
against compute, with the fits, their 90% bands and the predictions).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import optimize  # noqa: E402

from fmjax import errors  # noqa: E402
from fmjax.scaling import fit as fit_lib  # noqa: E402

NAMES = ("floor", "ceiling", "k", "L0")


@dataclasses.dataclass(frozen=True)
class SigmoidFit:
  """score(L) = floor + (ceiling - floor) * sigmoid(k * (L0 - L))."""
  floor: float
  ceiling: float
  k: float
  L0: float
  rmse: float = 0.0

  def __call__(self, L):
    return self.floor + (self.ceiling - self.floor) * _sigmoid(self.k * (self.L0 - np.asarray(L)))

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _sigmoid(z):
  return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|


def scores(rows: list[dict], metric: str) -> np.ndarray:
  """The `metric` of each row: "TASK/METRIC" in a record's `suite`, or a plain column.

  ValueError naming the first row without it and the metrics the rows do have."""
  out = []
  for i, row in enumerate(rows):
    value = row.get(metric)
    if value is None and "/" in metric:
      task, name = metric.rsplit("/", 1)
      value = ((row.get("suite") or {}).get(task) or {}).get("metrics", {}).get(name)
    if value is None:
      have = sorted(f"{t}/{m}" for t, r in (row.get("suite") or {}).items() for m in r["metrics"])
      raise ValueError(f"row {i + 1} ({row.get('name', '?')}) has no {metric!r}" + (
          f"; its suite has {', '.join(have)}" if have else
          "; run the sweep with train.eval_suite set, or name a column of the table"))
    out.append(float(value))
  return np.asarray(out)


def fit_sigmoid(L, y, floor: float | None = None, ceiling: float | None = None,
                start: SigmoidFit | None = None) -> SigmoidFit:
  """Least squares from a grid of starts (from `start` alone if given: a bootstrap refit
  near the full fit); `floor`/`ceiling` fixed where given.

  k may be negative (a score that rises with loss, such as bits per byte)."""
  L, y = np.asarray(L, float), np.asarray(y, float)
  free = [floor is None, ceiling is None, True, True]
  if sum(free) > len(L):
    raise ValueError(f"{len(L)} runs cannot fix {sum(free)} free parameters of the sigmoid; "
                     "fix the floor (chance) and the ceiling, or add runs")
  span = max(float(L.max() - L.min()), 1e-6)

  def full(theta):
    it = iter(theta)
    return [next(it) if f else v for f, v in zip(free, (floor, ceiling, None, None))]

  def residuals(theta):
    lo, hi, k, L0 = full(theta)
    return lo + (hi - lo) * _sigmoid(k * (L0 - L)) - y

  lo0 = float(y.min()) if floor is None else floor
  hi0 = float(y.max()) if ceiling is None else ceiling
  starts = ([(start.floor, start.ceiling, start.k, start.L0)] if start is not None else
            [(lo0, hi0, k / span, float(np.quantile(L, q)))
             for k in (1.0, 4.0, 16.0, -4.0) for q in (0.2, 0.5, 0.8)])
  best = None
  for x0 in starts:
    x0 = [v for f, v in zip(free, x0) if f]
    r = optimize.least_squares(residuals, x0, method="lm" if len(L) >= len(x0) else "trf")
    if best is None or r.cost < best.cost:
      best = r
  lo, hi, k, L0 = (float(v) for v in full(best.x))
  return SigmoidFit(lo, hi, k, L0, rmse=float(np.sqrt(np.mean(best.fun ** 2))))


def fit_downstream(C, L, y, *, floor=None, ceiling=None, predict_at=(), bootstrap: int = 200,
                   seed: int = 0, level: float = 0.9) -> dict:
  """The sigmoid of loss, the loss-compute law on the compute frontier, the chained
  predictions at `predict_at` FLOPs, and `level` bootstrap intervals of all of them."""
  C, L, y = (np.asarray(a, float) for a in (C, L, y))
  sig = fit_sigmoid(L, y, floor, ceiling)
  fC, fL = fit_lib.frontier(C, L)
  law = fit_lib.fit_compute(fC, fL) if len(fC) >= 3 else None

  def predictions(s: SigmoidFit, lw) -> list[tuple[float, float]]:
    if lw is None:
      return []
    return [(float(lw.E + lw.A / c ** lw.gamma),
             float(s(lw.E + lw.A / c ** lw.gamma))) for c in predict_at]

  point = predictions(sig, law)
  draws, rng = [], np.random.default_rng(seed)
  for _ in range(bootstrap):
    i = rng.integers(0, len(L), len(L))
    if len(np.unique(L[i])) < 4:
      continue
    try:
      s = fit_sigmoid(L[i], y[i], floor, ceiling, start=sig)
      bC, bL = fit_lib.frontier(C[i], L[i])
      lw = (fit_lib.fit_compute(bC, bL, start=law) if law is not None and len(bC) >= 3
            else None)
    except (ValueError, np.linalg.LinAlgError):
      continue
    draws.append((s, predictions(s, lw)))
  tail = 100 * (1 - level) / 2

  def interval(values):
    values = [v for v in values if math.isfinite(v)]
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))] \
        if len(values) >= 10 else None

  fixed = {"floor": floor, "ceiling": ceiling}
  intervals = {n: interval([getattr(s, n) for s, _ in draws]) for n in NAMES
               if fixed.get(n) is None}
  out = dict(
      sigmoid=dict(sig.as_dict(), intervals={n: v for n, v in intervals.items() if v}),
      compute=dataclasses.asdict(law) if law is not None else None,
      bootstrap=len(draws), level=level, points=len(L),
      asked=[float(c) for c in predict_at], predictions=[])
  for j, c in enumerate(predict_at):
    if not point:
      break
    p = [d[1][j] for d in draws if len(d[1]) > j]
    out["predictions"].append(dict(
        flops=float(c), loss=point[j][0], score=point[j][1],
        loss_interval=interval([v[0] for v in p]), score_interval=interval([v[1] for v in p])))
  out["_draws"] = draws  # for the plot's bands; dropped before writing
  return out


def report(result: dict, metric: str) -> str:
  s = result["sigmoid"]
  lines = [f"{metric} = floor + (ceiling - floor) * sigmoid(k (L0 - loss)), "
           f"{result['points']} runs, RMSE {s['rmse']:.4f}:"]
  for n in NAMES:
    ci = s["intervals"].get(n)
    lines.append(f"  {n:>7} = {s[n]:.4g}" + (f"   [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""))
  if c := result["compute"]:
    lines.append(f"loss(C) = {c['E']:.4g} + {c['A']:.4g} / C^{c['gamma']:.4f} "
                 "(the compute frontier)")
  elif result["asked"]:
    lines.append("no predictions: the compute frontier has fewer than 3 budgets to fit "
                 "loss(C) on")
  for p in result["predictions"]:
    si, li = p["score_interval"], p["loss_interval"]
    lines.append(f"  C={p['flops']:.3g}: loss {p['loss']:.4f}" +
                 (f" [{li[0]:.4f}, {li[1]:.4f}]" if li else "") +
                 f", {metric} {p['score']:.4f}" + (f" [{si[0]:.4f}, {si[1]:.4f}]" if si else ""))
  return "\n".join(lines)


def plot(result: dict, C, L, y, metric: str, path: str) -> str:
  """Two panels: the score against loss (fit and band), and against compute (the runs,
  the chained fit with its band, and the predictions with their intervals)."""
  sig = SigmoidFit(**{k: result["sigmoid"][k] for k in NAMES})
  draws = result.get("_draws", [])
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
  grid_L = np.linspace(min(L) - 0.1 * np.ptp(L), max(L) + 0.1 * np.ptp(L), 200)
  a.scatter(L, y, color="C0", zorder=3, label="runs")
  a.plot(grid_L, sig(grid_L), color="C1", label="sigmoid fit")
  if len(draws) >= 10:
    band = np.array([s(grid_L) for s, _ in draws])
    a.fill_between(grid_L, *np.percentile(band, [5, 95], axis=0), color="C1", alpha=0.2)
  a.set_xlabel("held-out loss (nats/token)")
  a.set_ylabel(metric)
  a.invert_xaxis()
  a.legend()
  b.scatter(C, y, color="C0", zorder=3, label="runs")
  if c := result["compute"]:
    top = max([p["flops"] for p in result["predictions"]] + list(C))
    grid_C = np.geomspace(min(C), top * 1.2, 200)
    b.plot(grid_C, sig(c["E"] + c["A"] / grid_C ** c["gamma"]), color="C1",
           label="sigmoid of L(C)")
    for p in result["predictions"]:
      err = p["score_interval"]
      b.errorbar([p["flops"]], [p["score"]], fmt="D", color="C3",
                 yerr=None if err is None else [[p["score"] - err[0]], [err[1] - p["score"]]],
                 capsize=4, label=f"prediction at {p['flops']:.2g}")
  b.set_xscale("log")
  b.set_xlabel("training FLOPs")
  b.set_ylabel(metric)
  b.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def points(rows: list[dict], metric: str):
  """(C, L, score) of the rows: the compute and loss columns fit.py finds, and `metric`."""
  table = fit_lib.points(rows)
  return table.C, table.L, scores(rows, metric)


def add_command(sub) -> None:
  """`downstream` as a subcommand of python -m fmjax.scaling."""
  p = sub.add_parser("downstream", help="fit a downstream score against loss and compute",
                     description=__doc__)
  p.add_argument("records", metavar="TABLE", help="a sweep's records.jsonl, or any JSONL/CSV "
                 "table with compute, loss and score columns")
  p.add_argument("--metric", required=True,
                 help="TASK/METRIC of the records' suite results (e.g. kjv_cloze/acc), or a "
                 "column of the table")
  p.add_argument("--out", required=True, help="directory for downstream.json and the plot")
  p.add_argument("--predict", type=float, nargs="*", default=(),
                 help="FLOP budgets to predict the score at")
  p.add_argument("--floor", type=float, default=None,
                 help="fix the score at high loss (chance, e.g. 0.25 for four choices)")
  p.add_argument("--ceiling", type=float, default=None,
                 help="fix the score at low loss (e.g. 1 for an accuracy)")
  p.add_argument("--bootstrap", type=int, default=200,
                 help="resamples for the 90%% intervals; 0 for none")


def run_command(args) -> int:
  """Reads the table, fits, writes downstream.json and downstream.png, prints the report."""
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    raise errors.UsageError(f"--out={args.out} is a file; name a directory")
  if args.bootstrap < 0:
    raise errors.UsageError(f"--bootstrap={args.bootstrap} must be >= 0")
  try:
    rows = fit_lib.load_table(args.records)
    C, L, y = points(rows, args.metric)
    result = fit_downstream(C, L, y, floor=args.floor, ceiling=args.ceiling,
                            predict_at=args.predict, bootstrap=args.bootstrap)
  except (ValueError, FileNotFoundError) as e:
    raise errors.Failure(f"{args.records}: {e}") from None
  os.makedirs(args.out, exist_ok=True)
  picture = plot(result, C, L, y, args.metric, os.path.join(args.out, "downstream.png"))
  result.pop("_draws")
  with open(os.path.join(args.out, "downstream.json"), "w") as f:
    json.dump(dict(result, metric=args.metric, records=args.records), f, indent=2)
  print(report(result, args.metric))
  print(f"plot: {picture}")
  return 0
