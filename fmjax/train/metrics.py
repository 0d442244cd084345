"""Run records: metrics.jsonl, TensorBoard events and the loss-curve plot."""

from __future__ import annotations

import contextlib
import json
import math
import os

import numpy as np


class MetricsWriter:
  """Appends one JSON record per logged step and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # small, and needs no TensorFlow
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)

  def write(self, step: int, record: dict):
    if not self.enabled:
      return
    record = {"step": int(step), **{k: v.item() if isinstance(v, (np.generic, np.ndarray)) else v
                                    for k, v in record.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(key, value, step)

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate(path: str, last_step: int) -> None:
  """Keeps only the records up to `last_step` (the step a run resumes from)."""
  kept = [r for r in read(path) if r["step"] <= last_step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
  os.replace(tmp, path)


def plot_loss_curve(records: list[dict], path: str, title: str = "") -> None:
  """Train and held-out loss against step, saved as a PNG."""
  train = [(r["step"], r["loss"]) for r in records if "loss" in r]
  held_out = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  with _figure(path, figsize=(7, 4.5)) as ax:
    if train:
      ax.plot(*zip(*train), label="train", lw=1.2)
    if held_out:
      ax.plot(*zip(*held_out), "o-", label="held-out", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def plot_expert_load(records: list[dict], path: str, title: str = "") -> bool:
  """Each expert's share of assignments against step (mean over MoE layers), and the
  busiest expert's load over the mean per layer; False (nothing written) without MoE records."""
  rows = [(r["step"], np.asarray(r["moe_load"])) for r in records if "moe_load" in r]
  if not rows:
    return False
  steps = [s for s, _ in rows]
  load_SLE = np.stack([load for _, load in rows])  # (steps, MoE layers, experts)
  n_experts = load_SLE.shape[-1]
  with _figure(path, 2, 1, figsize=(7, 7), sharex=True) as (top, bottom):
    for e, series in enumerate(load_SLE.mean(axis=1).T):
      top.plot(steps, series, lw=1, label=f"expert {e}" if n_experts <= 16 else None)
    top.axhline(1 / n_experts, color="k", ls="--", lw=1, label="balanced")
    top.set_ylabel("share of assignments (mean over layers)")
    top.set_title(title)
    if n_experts <= 16:
      top.legend(fontsize=7, ncol=4)
    for layer, series in enumerate(load_SLE.max(axis=2).T * n_experts):
      bottom.plot(steps, series, lw=1, label=f"MoE layer {layer}")
    bottom.axhline(1, color="k", ls="--", lw=1)
    bottom.set_ylabel("busiest expert / mean")
    bottom.set_xlabel("step")
    bottom.legend(fontsize=7)
    for ax in (top, bottom):
      ax.grid(alpha=0.3)
  return True


@contextlib.contextmanager
def _figure(path: str, *args, **kwargs):
  """The axes of a new figure (plt.subplots' arguments), saved as the PNG `path` after it."""
  import matplotlib  # only when plotting: slow to import
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # after the backend is chosen
  fig, axes = plt.subplots(*args, dpi=120, **kwargs)
  yield axes
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
