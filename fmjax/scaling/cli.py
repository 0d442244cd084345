"""The scaling-law command: fit a table of runs, plot it, and report.

  python -m fmjax.scaling fit TABLE --out=DIR [--predict C ...]
  python -m fmjax.scaling downstream TABLE --metric=TASK/METRIC --out=DIR [--predict C ...]
  python -m fmjax.scaling plan --records=TABLE --flops=C [--target_loss=L] [--holdout_largest]

TABLE is JSONL or CSV, one row per run: a sweep's records.jsonl, or published
results. It is read as is: the columns of N (params, N, parameters, model_size,
...), D (tokens, D, training_tokens, ...), the loss (final_eval_loss, loss,
val_loss, ...) and C (flops, C, compute, ...; 6 N D without one) are found by
name (fmjax.scaling.fit.COLUMN_NAMES), and --n_column, --d_column,
--loss_column and --c_column override them.
"""

from __future__ import annotations

import json
import os
import sys

from fmjax import errors
from fmjax.scaling import downstream, plan, plots
from fmjax.scaling.fit import PARAMETRIC_NAMES, ColumnError, fit_points, load_points

FLAGS = {"N": "n_column", "D": "d_column", "loss": "loss_column", "C": "c_column"}


def _fit(argv) -> int:
  parser = errors.ArgumentParser(prog="python -m fmjax.scaling", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  f = sub.add_parser("fit", help="fit, plot and predict from TABLE (JSONL or CSV)",
                     description=__doc__)
  f.add_argument("records", metavar="TABLE")
  f.add_argument("--out", required=True, help="directory for fit.json and the plots")
  f.add_argument("--n_column", default=None,
                 help="the model-size column (default: found by name; fmjax's records also "
                 "have non_embedding_params and active_params)")
  f.add_argument("--d_column", default=None, help="the training-tokens column")
  f.add_argument("--loss_column", default=None, help="the loss column")
  f.add_argument("--c_column", default=None, help="the compute column; '' for C = 6 N D")
  f.add_argument("--delta", type=float, default=1e-3, help="Huber delta on log-loss residuals")
  f.add_argument("--bootstrap", type=int, default=100,
                 help="resamples for the 90%% intervals of the parameters; 0 for none")
  f.add_argument("--predict", type=float, nargs="*", default=(),
                 help="FLOP budgets to give the compute-optimal N and D for")
  downstream.add_command(sub)
  plan.add_command(sub)
  args = parser.parse_args(argv)
  if args.command == "downstream":
    return downstream.run_command(args)
  if args.command == "plan":
    return plan.run_command(args)
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    raise errors.UsageError(f"--out={args.out} is a file; name a directory for fit.json and "
                            "the plots")
  try:
    table = load_points(args.records, args.n_column, args.d_column, args.loss_column,
                        args.c_column)
  except ColumnError as e:
    flag = FLAGS[e.role]
    raise errors.UsageError(f"--{flag}={e.given}: {e}" if e.given is not None
                            else f"{e}; name it with --{flag}=COLUMN") from None
  except ValueError as e:
    raise errors.Failure(e) from None
  print(f"{len(table.rows)} runs from {args.records}: {describe_columns(table.columns)}",
        file=sys.stderr)
  try:
    result = fit_points(table, delta=args.delta, bootstrap=args.bootstrap,
                        predict_at=args.predict, progress=True)
  except ValueError as e:
    raise errors.Failure(e) from None
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "fit.json"), "w") as fh:
    json.dump(result, fh, indent=2)
  paths = plots.plot_all(result, table.N, table.D, table.L, table.C, args.out)
  print("\n".join([report(result)] + [f"plot: {p}" for p in paths]))
  return 0


def main(argv=None) -> int:
  return errors.run(_fit, argv)


def describe_columns(found: dict) -> str:
  """'N=params, D=tokens, loss=final_eval_loss, C=flops' (C = 6 N D without a column)."""
  return ", ".join(f"{role}={name}" if name else "C = 6 N D" for role, name in found.items())


def report(result: dict) -> str:
  """A readable summary of `fit_all`'s result."""
  p = result["parametric"]
  lines = [f"{result['points']} runs" + (f" ({describe_columns(result['columns'])})"
                                         if "columns" in result else ""),
           "L(N, D) = E + A/N^alpha + B/D^beta:"]
  for k in PARAMETRIC_NAMES:
    ci = p["intervals"].get(k)
    lines.append(f"  {k:>5} = {p[k]:.4g}" + (f"   [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""))
  if h := result.get("entropy"):
    lines.append(f"  the data's entropy H = {h['H']:.4g}: E - H = {h['E_minus_H']:+.4g} "
                 f"({h['relative_gap']:+.1%}), H {'inside' if h['H_in_interval'] else 'outside'} "
                 "E's interval")
  if (ident := result.get("identifiability")) and not ident["E_identified"]:
    lines.append(f"  warning: across the runs A/N^alpha changes by {ident['N_term_change']:.1%} "
                 f"and B/D^beta by {ident['D_term_change']:.1%}: a term that barely changes acts "
                 f"as a constant, so E is not identified; the floor E + A/N^alpha at the largest "
                 f"N is {ident['floor_at_largest_N']:.4g}" + (
                     f" (H {result['entropy']['H']:.4g})" if "entropy" in result else ""))
  g = result["goodness"]
  lines.append(f"  R^2 (log) {g['r2_log']:.4f}, RMSE (log) {g['rmse_log']:.4f}, "
               f"mean |rel err| {g['mean_abs_rel_error']:.2%}")
  lobo = result["leave_one_budget_out"]["mean_abs_rel_error"]
  lines.append(f"  leave-one-budget-out mean |rel err| {lobo:.2%}")
  iso = result.get("isoflop", {})
  if "N_exponent" in iso:
    lines.append(f"IsoFLOP: N* ~ C^{iso['N_exponent']:.3f}, D* ~ C^{iso['D_exponent']:.3f}")
  if c := result.get("compute"):
    lines.append(f"L(C) = {c['E']:.4g} + {c['A']:.4g} / C^{c['gamma']:.4f}")
  lines.append("compute-optimal (parametric fit):")
  for o in result["compute_optimal"]:
    lines.append(f"  C={o['C']:.3g}: N={o['N']:.3g}, D={o['D']:.3g}, "
                 f"{o['tokens_per_param']:.1f} tokens/param, loss {o['loss']:.4f}")
  return "\n".join(lines)

