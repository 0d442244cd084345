"""A jax.profiler trace of a few train steps: train.profile_steps = "10:13".

"A:B" traces steps A to B-1 (steps count from 1, as in metrics.jsonl) into
<workdir>/profile: the trace starts before step A is dispatched and stops once
step B-1 has finished on the device. TensorBoard's profile plugin opens that
directory (tensorboard --logdir=<workdir>/profile); the perfetto_trace.json.gz
written beside the trace opens in https://ui.perfetto.dev. Only process 0
traces. A run resumed past A traces what is left of the window.
"""

from __future__ import annotations

import os
import re

import jax

_STEPS = re.compile(r"(\d+):(\d+)")


def parse_steps(text: str) -> tuple[int, int] | None:
  """'10:13' -> (10, 13); '' -> None. Raises ValueError on anything else."""
  text = text.strip()
  if not text:
    return None
  match = _STEPS.fullmatch(text)
  if not match:
    raise ValueError(f"{text!r} is not a window of steps like 10:13 (steps 10, 11 and 12)")
  first, stop = int(match.group(1)), int(match.group(2))
  if not 1 <= first < stop:
    raise ValueError(f"{text!r} must be FIRST:STOP with 1 <= FIRST < STOP, like 10:13")
  return first, stop


class Profiler:
  """Starts and stops the trace around the steps of the window; `log` prints where it is."""

  def __init__(self, window: str, workdir: str, enabled: bool = True, log=print):
    self.window = parse_steps(window) if enabled else None
    self.directory = os.path.join(workdir, "profile")
    self.log = log
    self.active = self.done = False

  def before(self, step: int):
    """Called before step `step` is dispatched."""
    if self.window is None or self.active or self.done:
      return
    first, stop = self.window
    if first <= step < stop:
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self.active = True
      self.first = step

  def after(self, step: int, outputs):
    """Called after step `step` is dispatched, with its outputs (still on the device)."""
    if self.active and step >= self.window[1] - 1:
      jax.block_until_ready(outputs)
      self.stop(step)

  def stop(self, last: int):
    if not self.active:
      return
    jax.profiler.stop_trace()
    self.active, self.done = False, True
    self.log(f"profile of steps {self.first} to {last}: {self.directory} (tensorboard "
             f"--logdir={self.directory}, or perfetto_trace.json.gz in https://ui.perfetto.dev)")
