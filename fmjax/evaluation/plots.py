"""Reliability diagrams: accuracy against confidence, bin by bin."""

from __future__ import annotations


def reliability_diagram(bins: list[dict], title: str, path: str) -> None:
  """Writes a PNG of per-bin accuracy (bars) against the diagonal of perfect calibration,
  with each bin's share of the examples below (fmjax.evaluation.metrics.calibration_bins)."""
  import matplotlib  # only when plotting: slow to import
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # after the backend is chosen

  width = bins[0]["high"] - bins[0]["low"]
  centres = [b["low"] + width / 2 for b in bins]
  total = max(sum(b["count"] for b in bins), 1)
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), sharex=True,
                                    gridspec_kw={"height_ratios": [3, 1]})
  filled = [(c, b) for c, b in zip(centres, bins) if b["count"]]
  top.bar([c for c, _ in filled], [b["accuracy"] for _, b in filled], width=width * 0.9,
          color="tab:blue", edgecolor="black", label="accuracy")
  top.scatter([c for c, _ in filled], [b["confidence"] for _, b in filled], marker="_", s=400,
              linewidths=2, color="tab:red", zorder=3, label="mean confidence")
  top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
  top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=title)
  top.legend(loc="upper left", fontsize=8)
  bottom.bar(centres, [b["count"] / total for b in bins], width=width * 0.9, color="gray")
  bottom.set(xlabel="confidence", ylabel="share of examples")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
