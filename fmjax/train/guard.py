"""What the loop does about non-finite steps and loss spikes.

The train step never applies a non-finite update: the optimizer is wrapped in
`optax.apply_if_finite`, which skips it and counts it (consecutive and total
counts are step metrics). `Guard` reads each fetched step's record and applies
the `train.nonfinite` policy:

- skip: go on; halt after `nonfinite_max_consecutive` skipped steps in a row;
- restore: after that many in a row, go back to the last checkpoint and skip
  every batch drawn since it; halt if it happens again before a finite step;
- halt: stop at the first one.

It also keeps exponential moving averages of the loss's mean and variance and
flags a loss more than `spike_zscore` standard deviations above the mean.

Fault injection, for drills and tests only: the environment variable
FMJAX_INJECT_NAN_BATCHES="5,6,7" makes the 5th, 6th and 7th batches drawn from
the train stream (counted from 1 over the run's whole history, as checkpoints
record it) produce a NaN loss, as a corrupt batch would.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

INJECT_ENV = "FMJAX_INJECT_NAN_BATCHES"


class NonFiniteError(RuntimeError):
  """The run stopped on non-finite losses or gradients, as its policy asks."""


@dataclasses.dataclass
class Verdict:
  restore: bool = False  # go back to the last checkpoint
  messages: list = dataclasses.field(default_factory=list)  # for the console
  record: dict = dataclasses.field(default_factory=dict)  # extra metrics fields
  log: bool = False  # write this step's record even off the log_every grid


class Guard:
  """Reads step records in order; holds the loss statistics (checkpointed with the run)."""

  def __init__(self, train_cfg, saved: dict | None = None):
    self.policy = train_cfg.nonfinite
    self.max_consecutive = train_cfg.nonfinite_max_consecutive
    self.zscore = train_cfg.spike_zscore
    self.decay = train_cfg.spike_decay
    self.warmup = math.ceil(1 / (1 - self.decay))  # records before the statistics count
    saved = saved or {}
    self.mean = saved.get("loss_mean", 0.0)
    self.var = saved.get("loss_var", 0.0)
    self.count = saved.get("loss_count", 0)
    self.finite_since_restore = True

  def state(self) -> dict:
    return {"loss_mean": self.mean, "loss_var": self.var, "loss_count": self.count}

  def restored(self):
    self.finite_since_restore = False

  def check(self, step: int, record: dict) -> Verdict:
    """The verdict on step `step` from its record; raises NonFiniteError to halt."""
    v = Verdict()
    loss = record["loss"]
    if record["nonfinite_consecutive"]:
      return self._nonfinite(step, record, v)
    self.finite_since_restore = True
    if self.zscore and self.count >= self.warmup:
      z = (loss - self.mean) / max(math.sqrt(self.var), 1e-8)
      if z > self.zscore:
        v.record["loss_spike_z"] = z
        v.log = True
        v.messages.append(
            f"step {step}: loss spike {loss:.4f}, {z:.1f} standard deviations above the "
            f"running mean {self.mean:.4f} (std {math.sqrt(self.var):.4f})")
    delta = loss - self.mean if self.count else 0.0
    self.mean = loss if not self.count else self.mean + (1 - self.decay) * delta
    self.var = self.decay * (self.var + (1 - self.decay) * delta * delta)
    self.count += 1
    return v

  def _nonfinite(self, step, record, v: Verdict) -> Verdict:
    n, total = record["nonfinite_consecutive"], record["nonfinite_total"]
    what = (f"step {step}: non-finite loss or gradients (loss {record['loss']}, grad norm "
            f"{record['grad_norm']}); the update was skipped ({n} in a row, {total} in all)")
    v.log = True
    if self.policy == "halt":
      raise NonFiniteError(f"{what}; stopping as train.nonfinite='halt' asks (the last "
                           "checkpoint holds the parameters before it)")
    if n < self.max_consecutive:
      v.messages.append(what)
      return v
    if self.policy == "skip":
      raise NonFiniteError(
          f"{what}; {n} in a row reaches train.nonfinite_max_consecutive={self.max_consecutive}, "
          "so the run is not learning: stopping (lower optimizer.lr, or set "
          "train.nonfinite='restore' to go back to the last checkpoint and skip these batches)")
    if not self.finite_since_restore:
      raise NonFiniteError(
          f"{what}; the last restore was followed by {n} non-finite steps and no finite one, "
          "so restoring again would not help: stopping")
    v.messages.append(f"{what}; going back to the last checkpoint and skipping the batches "
                      "drawn since it (train.nonfinite='restore')")
    v.restore = True
    return v


def injected_nan_batches() -> frozenset[int]:
  """Batch numbers (from 1) that FMJAX_INJECT_NAN_BATCHES asks to poison; usually none."""
  value = os.environ.get(INJECT_ENV, "").strip()
  try:
    return frozenset(int(b) for b in value.split(",") if b.strip())
  except ValueError:
    raise ValueError(f"{INJECT_ENV}={value!r} must be comma-separated batch numbers, "
                     "like 5,6,7") from None


def inject(batch: dict, number: int, poisoned: frozenset[int]) -> dict:
  """The batch, with a NaN loss mask if it is one of the `poisoned` batch numbers."""
  if number not in poisoned:
    return batch
  mask = np.full(batch["tokens"].shape, np.nan, np.float32)
  return dict(batch, loss_mask=mask)
