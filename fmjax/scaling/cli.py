"""The scaling-law command: fit a records table, plot it, and report.

  python -m fmjax.scaling fit RECORDS --out=DIR [--predict C ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fmjax.scaling import plots
from fmjax.scaling.fit import (PARAMETRIC_NAMES, columns, compare_entropy, fit_all,
                               known_entropy, load_table)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fmjax.scaling",
                                   description="Fit scaling laws to a records table.")
  sub = parser.add_subparsers(dest="command", required=True)
  f = sub.add_parser("fit", help="fit, plot and predict from RECORDS (JSONL or CSV)")
  f.add_argument("records")
  f.add_argument("--out", required=True, help="directory for fit.json and the plots")
  f.add_argument("--n_column", default="params",
                 help="the model-size column: params, non_embedding_params or active_params")
  f.add_argument("--d_column", default="tokens")
  f.add_argument("--loss_column", default="final_eval_loss")
  f.add_argument("--c_column", default="flops", help="'' for C = 6 N D")
  f.add_argument("--delta", type=float, default=1e-3, help="Huber delta on log-loss residuals")
  f.add_argument("--bootstrap", type=int, default=100)
  f.add_argument("--predict", type=float, nargs="*", default=(),
                 help="FLOP budgets to give the compute-optimal N and D for")
  args = parser.parse_args(argv)
  try:
    rows = load_table(args.records)
    N, D, L, C = columns(rows, args.n_column, args.d_column, args.loss_column,
                         args.c_column or None)
    result = fit_all(N, D, L, C, delta=args.delta, bootstrap=args.bootstrap,
                     predict_at=args.predict)
    entropy = known_entropy(rows)
    if entropy is not None:
      result["entropy"] = compare_entropy(result["parametric"], entropy)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "fit.json"), "w") as fh:
    json.dump(result, fh, indent=2)
  paths = plots.plot_all(result, N, D, L, C, args.out)
  print("\n".join([report(result)] + [f"plot: {p}" for p in paths]))
  return 0


def report(result: dict) -> str:
  """A readable summary of `fit_all`'s result."""
  p = result["parametric"]
  lines = [f"{result['points']} runs", "L(N, D) = E + A/N^alpha + B/D^beta:"]
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

