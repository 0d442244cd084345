"""A compute-optimal plan for a FLOP budget, with its uncertainty, as a runnable experiment.

  python -m fmjax.scaling plan --records=R.jsonl --flops=C [--target_loss=L] \
      [--no-holdout_largest] [--template=EXPERIMENT.py] [--out=PLAN.py]

From a sweep's records (or any table fmjax.scaling.fit reads):

  * Approach 3 (the parametric fit L(N, D), fmjax.scaling.fit.fit_parametric):
    N_opt, D_opt and the loss at C under C = 6 N D, with percentile intervals
    from refitting bootstrap resamples of the runs;
  * Approach 2 (IsoFLOP parabolas, fmjax.scaling.fit.fit_isoflop): N*(C) and
    D*(C) extrapolated as power laws, intervals from a residual bootstrap of the
    parabolas; a warning when the two approaches' intervals for N or D do not overlap;
  * `--target_loss`: the smallest budget whose compute-optimal loss reaches it;
  * honest extrapolation (on by default): the fit without the largest budget,
    and how well it predicts that budget's runs and its best loss;
  * where the records carry downstream results (`suite`, fmjax.scaling.downstream),
    the score predicted at the plan's loss, for each task metric every row has;
  * an experiment file for the plan: the size dial's depth whose parameter count
    is nearest N_opt, D_opt tokens, the sweep's batch and learning rate (under µP,
    the transferred one), and the plan's numbers in its docstring. Its template
    is the config.json of the largest run in the records, or --template.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys

import numpy as np

from fmjax import config as config_lib
from fmjax import errors
from fmjax.nn import cost
from fmjax.scaling import fit as fit_lib
from fmjax.scaling import sizing

LEVEL = 0.9  # the intervals' coverage
N_COUNTS = {"params": "total", "non_embedding_params": "non_embedding", "active_params": "active"}


def _interval(values, level: float = LEVEL) -> list[float]:
  values = np.asarray([v for v in values if np.isfinite(v)], np.float64)
  if not len(values):
    return [float("nan"), float("nan")]
  lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
  return [float(lo), float(hi)]


def _resamples(n_runs: int, bootstrap: int, seed: int):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, n_runs, n_runs) for _ in range(bootstrap)]


def approach3(N, D, L, C: float, bootstrap: int = 100, seed: int = 0, per_token=(6.0, 1.0)):
  """Approach 3 at budget C: ({N, D, loss and their intervals, the fit}, the fit, its
  bootstrap refits). The budget is spent at `per_token` = (c, p) FLOPs per token,
  c N^p (fit.flops_per_token_law of the runs: the unit the runs' budgets are in)."""
  fit = fit_lib.fit_parametric(N, D, L)
  fits = [fit_lib.refit(fit, N, D, L, rows) for rows in _resamples(len(L), bootstrap, seed)]
  fit.intervals = {k: tuple(_interval([getattr(f, k) for f in fits]))
                   for k in fit_lib.PARAMETRIC_NAMES} if fits else {}
  best = fit_lib.compute_optimal(fit, C, per_token)
  samples = [fit_lib.compute_optimal(f, C, per_token) for f in fits]
  out = {"fit": fit.as_dict()}
  for k in ("N", "D", "loss"):
    out[k] = float(best[k])
    out[k + "_interval"] = _interval([s[k] for s in samples]) if samples else None
  out["tokens_per_param"] = out["D"] / out["N"]
  # the refits' laws, so that the run the plan writes is priced with an interval too
  out["refits"] = [{k: getattr(f, k) for k in fit_lib.PARAMETRIC_NAMES} for f in fits]
  return out, fit, fits


def predict_run(a3: dict, N: float, D: float) -> tuple[float, list[float]]:
  """Approach 3's loss at (N, D) and its interval over the bootstrap refits."""
  law = lambda p: float(fit_lib.ParametricFit(
      **{k: p[k] for k in fit_lib.PARAMETRIC_NAMES}, objective=0.0).predict(N, D))
  return law(a3["fit"]), _interval([law(p) for p in a3["refits"]]) if a3["refits"] else None


def approach2(N, D, L, C_runs, C: float, bootstrap: int = 100, seed: int = 0) -> dict:
  """Approach 2 at budget C (N and D), or {"skipped": why} when the runs do not support it.

  Intervals: a residual bootstrap of the IsoFLOP parabolas (each budget's losses
  redrawn as its parabola plus resampled residuals of that budget), so every
  resample keeps the swept sizes.
  """
  labels = fit_lib.group_budgets(C_runs)
  try:
    iso = fit_lib.fit_isoflop(N, D, L, C_runs, labels)
  except ValueError as e:
    return {"skipped": str(e)}

  def at(iso):
    return iso.N_coefficient * C**iso.N_exponent, iso.D_coefficient * C**iso.D_exponent

  fitted, residuals = np.empty_like(L), np.empty_like(L)
  for k, b in zip(np.unique(labels), iso.budgets):
    sel = labels == k
    fitted[sel] = np.polyval(b["parabola"], np.log(N[sel]))
    residuals[sel] = L[sel] - fitted[sel]
  rng = np.random.default_rng(seed)
  samples = []
  for _ in range(bootstrap):
    redrawn = fitted.copy()
    for k in np.unique(labels):
      sel = np.flatnonzero(labels == k)
      redrawn[sel] += rng.choice(residuals[sel], len(sel))
    try:
      samples.append(at(fit_lib.fit_isoflop(N, D, redrawn, C_runs, labels)))
    except ValueError:  # a resample whose parabola has no minimum
      continue
  n, d = at(iso)
  out = {"N": float(n), "D": float(d), "tokens_per_param": float(d / n),
         "N_exponent": iso.N_exponent, "D_exponent": iso.D_exponent, "resamples": len(samples)}
  for i, k in enumerate(("N", "D")):
    out[k + "_interval"] = _interval([s[i] for s in samples]) if samples else None
  return out


def _overlap(a, b) -> bool:
  return a is None or b is None or not (a[1] < b[0] or b[1] < a[0])


def disagreements(a2: dict, a3: dict) -> list[str]:
  """The quantities whose Approach 2 and 3 intervals do not overlap."""
  if "skipped" in a2:
    return []
  return [k for k in ("N", "D") if not _overlap(a2.get(k + "_interval"), a3.get(k + "_interval"))]


def budget_for_loss(fit, target: float, per_token=(6.0, 1.0)):
  """The smallest C whose compute-optimal loss under `fit` is `target`; None if it is
  at or below the fit's irreducible loss E."""
  if target <= fit.E:
    return None
  lo, hi = 1.0, 1e40
  if float(fit_lib.compute_optimal(fit, lo, per_token)["loss"]) <= target:
    return lo
  for _ in range(200):  # bisection in log C: the optimal loss falls with C
    mid = math.sqrt(lo * hi)
    if float(fit_lib.compute_optimal(fit, mid, per_token)["loss"]) > target:
      lo = mid
    else:
      hi = mid
  return hi


def holdout_largest(N, D, L, C_runs, bootstrap: int = 100, seed: int = 0,
                    per_token=(6.0, 1.0)) -> dict:
  """The fit without the largest budget, predicting it: its runs' losses (mean |relative
  error|) and its best loss against the compute-optimal loss planned for it."""
  labels = fit_lib.group_budgets(C_runs)
  held = labels == labels.max()
  keep = np.flatnonzero(~held)
  if len(keep) < 5 or len(np.unique(labels)) < 2:
    return {"skipped": "needs 2 or more budgets and 5 or more runs outside the largest"}
  C_held = float(np.exp(np.mean(np.log(C_runs[held]))))
  a3, fit, fits = approach3(N[keep], D[keep], L[keep], C_held, bootstrap, seed, per_token)
  pred = fit.predict(N[held], D[held])
  i = np.flatnonzero(held)[np.argmin(L[held])]
  run_samples = [float(f.predict(N[i], D[i])) for f in fits]
  interval = _interval(run_samples) if fits else None
  return {
      "C": C_held, "runs": int(held.sum()),
      "mean_abs_rel_error": float(np.mean(np.abs(pred - L[held]) / L[held])),
      "best_run": {"N": float(N[i]), "D": float(D[i]), "loss": float(L[i]),
                   "predicted": float(fit.predict(N[i], D[i])), "interval": interval,
                   "inside": bool(interval[0] <= L[i] <= interval[1]) if interval else None},
      "planned_loss": a3["loss"], "planned_interval": a3["loss_interval"],
      "planned_N": a3["N"], "planned_D": a3["D"],
  }


def downstream_predictions(rows: list[dict], L, loss: float, loss_interval) -> dict:
  """Each `suite` metric every row has, predicted at the plan's loss by a sigmoid of loss
  (fmjax.scaling.downstream); {} when the rows carry no suite results."""
  from fmjax.scaling import downstream  # noqa: I001  (only when records carry suites)
  suites = [r.get("suite") or {} for r in rows]
  if not all(suites):
    return {}
  metrics = set.intersection(*({f"{t}/{m}" for t, res in s.items()
                                for m, v in res.get("metrics", {}).items()
                                if isinstance(v, (int, float))} for s in suites))
  out = {}
  for metric in sorted(metrics):
    try:
      y = downstream.scores(rows, metric)
      sig = downstream.fit_sigmoid(L, y)
    except (ValueError, RuntimeError):
      continue
    out[metric] = {"score": float(sig(loss)),
                   "interval": sorted(float(sig(x)) for x in loss_interval)
                   if loss_interval else None}
  return out


# ---------------------------------------------------------------------------
# The experiment file


def template_config(rows: list[dict], N, template: str | None = None):
  """The config the planned run starts from: --template's get_config(), else the
  config.json of the largest run in the records that has one."""
  if template:
    if not os.path.isfile(template):
      raise FileNotFoundError(f"--template={template}: no such experiment file")
    spec = importlib.util.spec_from_file_location("fmjax_plan_template", template)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(), template
  for i in np.argsort(-np.asarray(N)):
    path = os.path.join(str(rows[i].get("workdir", "")), "config.json")
    if rows[i].get("workdir") and os.path.exists(path):
      with open(path) as f:
        return config_lib.from_json(f.read()), path
  raise FileNotFoundError("no run in the records has a workdir with a config.json to "
                          "start the planned run from; name an experiment file with --template")


def choose_depth(model_cfg, N_target: float, count: str = "total", max_depth: int = 256):
  """The size dial's depth whose parameter count (`count`: total, non_embedding or
  active) is nearest N_target in log scale, and that count."""
  best = None
  for depth in range(1, max_depth + 1):
    m = config_lib.from_json(config_lib.to_json(model_cfg))
    m.depth = depth
    sizing.apply_depth(m)
    counts = cost.param_counts(m)
    n = counts.get(count, counts["total"])
    gap = abs(math.log(n / N_target))
    if best is None or gap < best[0]:
      best = (gap, depth, n)
    elif n > N_target:
      break
  return best[1], best[2]


def _assignments(cfg, base, prefix: str = "c") -> list[str]:
  """`c.a.b = value` for each leaf of cfg that differs from base."""
  lines = []
  for key in cfg:
    value, path = cfg[key], f"{prefix}.{key}"
    if key not in base:
      continue  # a field this fmjax no longer has
    if hasattr(value, "keys"):
      lines += _assignments(value, base[key], path)
    elif value != base[key]:
      lines.append(f"{path} = {value!r}")
  return lines


def experiment_text(cfg, plan: dict, command: str) -> str:
  """A runnable experiment file for the plan, its numbers in the docstring."""
  body = "\n".join("  " + line for line in _assignments(cfg, config_lib.base()))
  return f'''"""The compute-optimal run planned for C = {plan["C"]:.3g} FLOPs.

Written by:

  {command}

{report(plan)}

Run it:

  python -m fmjax.main --config={plan["experiment"]} --workdir=runs/{plan["name"]}
"""

from fmjax import config


def get_config():
  c = config.base()
{body}
  return c
'''


def make_cfg(template, plan: dict, count: str):
  """The template at the dial's depth nearest the plan's N, trained for the budget C
  (train.flops: its tokens are C over that model's own FLOPs per token)."""
  cfg = config_lib.from_json(config_lib.to_json(template))
  depth, n = choose_depth(cfg.model, plan["approach3"]["N"], count)
  cfg.model.depth = depth
  cfg.train.update(tokens=0, flops=float(plan["C"]), tokens_per_param=0.0)
  cfg.optimizer.decay_steps = 0
  cfg.checkpoint.init_from = ""
  resolved = sizing.resolve(cfg)
  plan["run"] = {"depth": depth, "params": n, "count": count, "d_model": resolved.model.d_model,
                 "n_layers": resolved.model.n_layers,
                 "tokens": resolved.train.steps * sizing.tokens_per_step(resolved),
                 "steps": resolved.train.steps, "batch_size": cfg.train.batch_size,
                 "seq_len": cfg.data.seq_len, "lr": cfg.optimizer.lr,
                 "parametrization": cfg.model.get("parametrization", "sp"),
                 "flops": resolved.train.steps * sizing.tokens_per_step(resolved) *
                 cost.flops_per_token(resolved.model, cfg.data.seq_len)}
  # The dial's depth is not N, nor its tokens D: the loss of the run as written
  plan["run"]["loss"], plan["run"]["loss_interval"] = predict_run(
      plan["approach3"], n, plan["run"]["tokens"])
  return cfg


# ---------------------------------------------------------------------------
# The plan


def make_plan(points, C: float, target_loss: float | None = None, bootstrap: int = 100,
              holdout: bool = True, seed: int = 0) -> dict:
  """Every number of the plan for budget C, from a table's `points` (fit.Points)."""
  N, D, L, C_runs = points.N, points.D, points.L, points.C
  # C is in the runs' own FLOP unit (fmjax's count, or 6 N D for a table without one):
  # Approach 3 spends it at their FLOPs per token, c N^p, as Approach 2's budgets do
  per_token = fit_lib.flops_per_token_law(N, D, C_runs)
  a3, fit, fits = approach3(N, D, L, C, bootstrap, seed, per_token)
  plan = {"C": float(C), "runs": int(len(L)), "columns": dict(points.columns),
          "flops_per_token": {"c": per_token[0], "p": per_token[1]},
          "approach3": a3, "approach2": approach2(N, D, L, C_runs, C, bootstrap, seed)}
  plan["disagree"] = disagreements(plan["approach2"], a3)
  if target_loss is not None:
    c = budget_for_loss(fit, target_loss, per_token)
    samples = [budget_for_loss(f, target_loss, per_token) for f in fits]
    plan["target"] = {"loss": target_loss, "C": c, "C_interval": _interval(
        [s if s is not None else float("inf") for s in samples]) if samples else None}
    if c is not None:
      plan["target"].update({k: float(v) for k, v in
                             fit_lib.compute_optimal(fit, c, per_token).items()})
  if holdout:
    plan["holdout"] = holdout_largest(N, D, L, C_runs, bootstrap, seed, per_token)
  plan["downstream"] = downstream_predictions(points.rows, L, a3["loss"], a3["loss_interval"])
  return plan


def _ci(x) -> str:
  return f" [{x[0]:.3g}, {x[1]:.3g}]" if x and all(map(math.isfinite, x)) else ""


def report(plan: dict) -> str:
  a3, a2 = plan["approach3"], plan["approach2"]
  f = a3["fit"]
  lines = [f"Plan for C = {plan['C']:.3g} FLOPs from {plan['runs']} runs "
           f"({int(LEVEL * 100)}% bootstrap intervals):",
           f"  FLOPs per token of the runs: {plan['flops_per_token']['c']:.4g} "
           f"N^{plan['flops_per_token']['p']:.4g} (6 N for 6 N D)",
           f"  Approach 3, L(N, D) = {f['E']:.4g} + {f['A']:.4g}/N^{f['alpha']:.4g} + "
           f"{f['B']:.4g}/D^{f['beta']:.4g}:",
           f"    N = {a3['N']:.4g}{_ci(a3['N_interval'])}, D = {a3['D']:.4g}"
           f"{_ci(a3['D_interval'])} ({a3['tokens_per_param']:.1f} tokens/param), "
           f"loss {a3['loss']:.4f}{_ci(a3['loss_interval'])}"]
  if "skipped" in a2:
    lines.append(f"  Approach 2 (IsoFLOP): skipped: {a2['skipped']}")
  else:
    lines.append(f"  Approach 2 (IsoFLOP), N* ~ C^{a2['N_exponent']:.3f}, "
                 f"D* ~ C^{a2['D_exponent']:.3f}:")
    lines.append(f"    N = {a2['N']:.4g}{_ci(a2['N_interval'])}, D = {a2['D']:.4g}"
                 f"{_ci(a2['D_interval'])} ({a2['tokens_per_param']:.1f} tokens/param)")
  for k in plan.get("disagree", []):
    lines.append(f"  warning: Approaches 2 and 3 disagree on {k} beyond their intervals "
                 f"({a2[k]:.3g}{_ci(a2[k + '_interval'])} vs {a3[k]:.3g}"
                 f"{_ci(a3[k + '_interval'])}): the extrapolation is not to be trusted")
  if t := plan.get("target"):
    if t["C"] is None:
      lines.append(f"  target loss {t['loss']}: at or below the fitted irreducible loss "
                   f"E = {f['E']:.4g}; no budget reaches it")
    else:
      lines.append(f"  target loss {t['loss']}: C = {t['C']:.4g}{_ci(t['C_interval'])}, "
                   f"N = {t['N']:.4g}, D = {t['D']:.4g}")
  if h := plan.get("holdout"):
    if "skipped" in h:
      lines.append(f"  holdout of the largest budget: skipped ({h['skipped']})")
    else:
      b = h["best_run"]
      lines.append(f"  holdout: fitted without the largest budget (C = {h['C']:.3g}, "
                   f"{h['runs']} runs), its runs' losses are predicted with mean |rel err| "
                   f"{h['mean_abs_rel_error']:.2%}; its best run {b['loss']:.4f} against "
                   f"{b['predicted']:.4f}{_ci(b['interval'])}" +
                   ("" if b["inside"] is None else
                    f" ({'inside' if b['inside'] else 'outside'} the interval)") +
                   f"; planned optimum "
                   f"{h['planned_loss']:.4f}{_ci(h['planned_interval'])}")
  for metric, d in (plan.get("downstream") or {}).items():
    lines.append(f"  downstream {metric}: {d['score']:.4g}{_ci(d['interval'])} at the "
                 "planned loss")
  if r := plan.get("run"):
    lines.append(f"  planned run: depth {r['depth']} (d_model {r['d_model']}, "
                 f"{r['n_layers']} layers, {r['params']:,} {r['count']} params), "
                 f"{r['tokens']:,} tokens = {r['steps']} steps of {r['batch_size']} x "
                 f"{r['seq_len']}, {r['flops']:.3g} FLOPs; lr {r['lr']:g} ({r['parametrization']}"
                 + (": transferred from the sweep's widths by µP)" if r["parametrization"] == "mup"
                    else ": SP does not transfer the learning rate across widths; retune it)"))
    lines.append(f"  the planned run's own loss (its N and D, not the optimum's): "
                 f"{r['loss']:.4f}{_ci(r['loss_interval'])}")
  return "\n".join(lines)


def run_command(args) -> int:
  """`python -m fmjax.scaling plan` (fmjax.scaling.cli)."""
  if args.flops <= 0:
    raise errors.UsageError(f"--flops={args.flops:g} must be > 0")
  if args.target_loss is not None and args.target_loss <= 0:
    raise errors.UsageError(f"--target_loss={args.target_loss:g} must be > 0")
  try:
    points = fit_lib.load_points(args.records, args.n_column, args.d_column, args.loss_column,
                                 args.c_column)
    plan = make_plan(points, args.flops, args.target_loss, args.bootstrap,
                     args.holdout_largest)
  except fit_lib.ColumnError as e:
    raise errors.UsageError(str(e)) from None
  except ValueError as e:
    raise errors.Failure(e) from None
  name = f"plan_C{args.flops:.3g}".replace("+", "")
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.records)), name + ".py")
  plan.update(name=name, experiment=out)
  try:
    template, source = template_config(points.rows, points.N, args.template)
  except FileNotFoundError as e:
    raise errors.Failure(e) from None
  count = N_COUNTS.get(points.columns["N"], "total")
  cfg = make_cfg(template, plan, count)
  plan["template"] = source
  command = " ".join(["python -m fmjax.scaling plan"] + sys.argv[2:]) if len(sys.argv) > 2 \
      else f"python -m fmjax.scaling plan --records={args.records} --flops={args.flops:g}"
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    f.write(experiment_text(cfg, plan, command))
  with open(os.path.splitext(out)[0] + ".json", "w") as f:
    json.dump(plan, f, indent=2)
  print(report(plan))
  print(f"experiment: {out} (from {source})")
  return 0


def add_command(sub) -> None:
  p = sub.add_parser("plan", help="the compute-optimal N and D for a budget, and its experiment",
                     description=__doc__)
  p.add_argument("--records", required=True, help="a sweep's records.jsonl (or any table)")
  p.add_argument("--flops", type=float, required=True, help="the training-FLOP budget C")
  p.add_argument("--target_loss", type=float, default=None,
                 help="also give the smallest budget whose optimal loss reaches this")
  p.add_argument("--holdout_largest", action=argparse.BooleanOptionalAction,
                 default=True, help="check the fit without the largest budget against it")
  p.add_argument("--bootstrap", type=int, default=100, help="resamples for the intervals")
  p.add_argument("--template", default=None,
                 help="experiment file the planned run starts from (default: the config.json "
                 "of the largest run in the records)")
  p.add_argument("--out", default=None,
                 help="the experiment file to write (default: plan_C<C>.py beside the records)")
  p.add_argument("--n_column", default=None, help="the model-size column")
  p.add_argument("--d_column", default=None, help="the training-tokens column")
  p.add_argument("--loss_column", default=None, help="the loss column")
  p.add_argument("--c_column", default=None, help="the compute column; '' for C = 6 N D")
