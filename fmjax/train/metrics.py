"""Run records: metrics.jsonl, TensorBoard events, Weights & Biases, and the plots.

metrics.jsonl is the record: one JSON object per logged step, keys as the
loop names them (loss, eval_loss, ...). TensorBoard (<workdir>/tensorboard) and,
with train.wandb_project set, Weights & Biases get the same numbers, grouped
by tag: eval_* keys as eval/*, a suite's suite/TASK/METRIC as they are, every
other one as train/* (train/loss, eval/loss). Both are opened at the first record, so a run that fails before
its first step leaves no event file. wandb is imported only when a project is
set; its run id is kept in <workdir>/wandb_run_id, so a resumed run logs into
the same W&B run (W&B drops the steps it already has).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import uuid

import numpy as np

from fmjax.errors import ConfigError, Failure

WANDB_EXTRA = "pip install 'fmjax[wandb]'"


class WandbError(Failure):
  """Weights & Biases could not start a run (not logged in, no network, ...)."""


def tag(key: str) -> str:
  """The TensorBoard and W&B name of a record key: eval_loss -> eval/loss, loss -> train/loss;
  a suite's keys (suite/TASK/METRIC) are their own names."""
  if key.startswith("suite/"):
    return key
  return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


def import_wandb(project: str):
  """The wandb module; ConfigError naming the extra to install if it is missing."""
  try:
    return importlib.import_module("wandb")
  except ImportError:
    raise ConfigError(f"train.wandb_project={project!r} needs the wandb package, which is not "
                      f"installed: {WANDB_EXTRA} (or set train.wandb_project='')") from None


class MetricsWriter:
  """Appends one JSON record per logged step and mirrors its numbers to TensorBoard and,
  if `wandb_project` is set, to Weights & Biases (run config `config`)."""

  def __init__(self, workdir: str, enabled: bool = True, wandb_project: str = "",
               config: dict | None = None):
    self.enabled = enabled
    self.workdir = workdir
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.wandb_project, self.config = wandb_project, config
    self._tb = self._wandb = None

  def _open(self):
    from tensorboardX import SummaryWriter  # small, and needs no TensorFlow
    self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"), flush_secs=10)
    if self.wandb_project:
      self._wandb = self._start_wandb()

  def _start_wandb(self):
    wandb = import_wandb(self.wandb_project)
    id_path = os.path.join(self.workdir, "wandb_run_id")
    if os.path.exists(id_path):
      with open(id_path) as f:
        run_id = f.read().strip()
    else:
      run_id = uuid.uuid4().hex[:12]
      with open(id_path, "w") as f:
        f.write(run_id + "\n")
    try:
      return wandb.init(project=self.wandb_project, id=run_id, resume="allow",
                        name=os.path.basename(os.path.abspath(self.workdir)),
                        dir=self.workdir, config=self.config)
    except Exception as e:  # wandb raises its own kinds for login, network and quota
      first = (str(e).strip().splitlines() or [""])[0][:300]
      raise WandbError(f"train.wandb_project={self.wandb_project!r}: wandb.init failed "
                       f"({type(e).__name__}: {first}); run `wandb login`, or set "
                       "WANDB_MODE=offline, or train.wandb_project=''") from e

  def write(self, step: int, record: dict):
    if not self.enabled:
      return
    if self._tb is None:
      self._open()
    record = {"step": int(step), **{k: v.item() if isinstance(v, (np.generic, np.ndarray)) else v
                                    for k, v in record.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    scalars = {tag(k): v for k, v in record.items()
               if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    if self._wandb is not None and scalars:
      self._wandb.log(scalars, step=int(step))

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._wandb is not None:
      with contextlib.suppress(Exception):  # metrics.jsonl holds the record regardless
        self._wandb.finish()
      self._wandb = None


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
