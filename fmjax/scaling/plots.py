"""Plots of scaling-law fits: the compute frontier, IsoFLOP curves, predicted vs observed.

Each function takes the dict `fmjax.scaling.fit.fit_all` returns plus the points it
was fitted on, and writes one PNG.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fmjax.scaling import fit as scaling  # noqa: E402


def _save(fig, path):
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _parametric(result):
  p = result["parametric"]
  return scaling.ParametricFit(**{k: p[k] for k in scaling.PARAMETRIC_NAMES + ("objective",)})


def plot_frontier(result, N, D, L, C, path):
  """Loss against compute for every run, with the fitted compute-optimal frontier."""
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  sc = ax.scatter(C, L, c=np.log10(N), cmap="viridis", s=28, zorder=3)
  fig.colorbar(sc, ax=ax, label="log10 N")
  grid = np.geomspace(C.min() / 2, C.max() * 100, 200)
  opt = scaling.compute_optimal(_parametric(result), grid)
  ax.plot(grid, opt["loss"], "k-", lw=1.2, label="L(N_opt(C), D_opt(C)) from L(N, D)")
  if "compute" in result:
    cf = scaling.ComputeFit(**result["compute"])
    ax.plot(grid, cf.predict(grid), "r--", lw=1.0,
            label=f"L(C) = {cf.E:.3g} + {cf.A:.3g}/C^{cf.gamma:.3f}")
  ax.axhline(result["parametric"]["E"], color="gray", ls=":", lw=1, label="fitted E")
  if "entropy" in result:
    ax.axhline(result["entropy"]["H"], color="black", ls="--", lw=1, label="data entropy H")
  ax.set(xscale="log", xlabel="training FLOPs C", ylabel="held-out loss",
         title="Loss against compute")
  ax.legend(fontsize=8)
  return _save(fig, path)


def plot_isoflop(result, N, D, L, C, path):
  """One parabola in log N per budget, with its minimum."""
  iso = result.get("isoflop", {})
  if "budgets" not in iso:
    return None
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  labels = scaling.group_budgets(C)
  colors = plt.cm.plasma(np.linspace(0, 0.85, len(iso["budgets"])))
  for k, (b, color) in enumerate(zip(iso["budgets"], colors)):
    sel = labels == k
    ax.scatter(N[sel], L[sel], color=color, s=24, zorder=3)
    x = np.linspace(np.log(N[sel].min()) - 0.3, np.log(N[sel].max()) + 0.3, 100)
    ax.plot(np.exp(x), np.polyval(b["parabola"], x), color=color, lw=1,
            label=f"C = {b['C']:.2g}")
    ax.plot(b["N_opt"], b["loss_opt"], marker="*", ms=12, color=color, mec="k", zorder=4)
  ax.set(xscale="log", xlabel="parameters N", ylabel="held-out loss",
         title=f"IsoFLOP profiles: N* ~ C^{iso['N_exponent']:.2f}")
  ax.legend(fontsize=8)
  return _save(fig, path)


def plot_predicted(result, N, D, L, C, path):
  """The parametric fit's prediction against each observed loss."""
  pred = _parametric(result).predict(N, D)
  fig, ax = plt.subplots(figsize=(4.8, 4.4))
  ax.scatter(L, pred, s=24, c=np.log10(C), cmap="plasma")
  lo, hi = min(L.min(), pred.min()), max(L.max(), pred.max())
  ax.plot([lo, hi], [lo, hi], "k--", lw=1)
  g = result["goodness"]
  ax.set(xlabel="observed loss", ylabel="predicted loss",
         title=f"L(N, D) fit: R² {g['r2_log']:.3f}, |err| {g['mean_abs_rel_error']:.2%}")
  return _save(fig, path)


def plot_all(result, N, D, L, C, out_dir) -> list[str]:
  paths = [plot_frontier(result, N, D, L, C, os.path.join(out_dir, "loss_vs_compute.png")),
           plot_isoflop(result, N, D, L, C, os.path.join(out_dir, "isoflop.png")),
           plot_predicted(result, N, D, L, C, os.path.join(out_dir, "predicted_vs_observed.png"))]
  return [p for p in paths if p]
