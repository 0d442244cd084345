"""Stopping a run early and cleanly: on SIGTERM or Ctrl-C, or when train.max_runtime runs out.

A spot or preemptible TPU VM gets SIGTERM shortly before it goes away; a
batch scheduler sends it before a job's time limit; a person at the terminal
presses Ctrl-C (SIGINT). `Stop` turns either signal, or the run's wall-clock
budget running out, into a request that the training loop reads once per
step: the loop finishes the step, saves a checkpoint and returns, and the
command exits 0 (fmjax.errors.OK), as for a finished run; the same command
resumes exactly from there. Exit 0 rather than 130 because nothing was lost:
the stop is a clean end of this part of the run, as it is for SIGTERM.

A second Ctrl-C aborts at once: the first one puts SIGINT back to the
system's default action, so the second ends the process where it stands,
even inside a compile or a long step (exit status 130 in a shell,
fmjax.errors.INTERRUPTED; no checkpoint is written, and the next run resumes
from the last complete one and removes any half-written save).

With several processes, every one must stop after the same step (saving a
checkpoint is collective), even if only one of them got the signal or its
clock ran out first. Each step, each process puts its own request into a
tiny all-reduce (the maximum over processes), dispatched right after the
step and read one step later, so the host never waits on it: every process
reads the same answer after the same step. With one process there is nothing
to agree on and the request is read at once.
"""

from __future__ import annotations

import os
import re
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

REASONS = ("", "SIGTERM", "max_runtime", "SIGINT")  # indexed by the code the processes agree on
STOPPING = ("\nCtrl-C: stopping after this step with a checkpoint; press Ctrl-C again to "
            "abort at once, without one\n")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([dhms]?)")
_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1, "": 1}


def parse_duration(text: str) -> float:
  """'3600', '3600s', '90m', '2h', '1h30m', '1d' -> seconds; '' -> 0 (no limit).

  Raises ValueError on anything else.
  """
  text = text.strip().lower()
  if not text:
    return 0.0
  parts = _DURATION.findall(text)
  if not parts or "".join(n + u for n, u in parts) != text or \
      (len(parts) > 1 and any(u == "" for _, u in parts)):
    raise ValueError(f"{text!r} is not a duration like 3600, 90m, 2h or 1h30m")
  return sum(float(n) * _SECONDS[u] for n, u in parts)


class Stop:
  """Whether the run should stop after the step just dispatched, agreed by all processes."""

  def __init__(self, max_runtime_s: float = 0.0, started: float | None = None):
    self._signalled = 0  # an index into REASONS
    started = time.time() if started is None else started
    self._deadline = started + max_runtime_s if max_runtime_s > 0 else None
    self._pending = None
    self._agree = _all_reduce_max() if jax.process_count() > 1 else None
    self._previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[signum] = signal.signal(signum, self._on_signal)
      except ValueError:  # not the main thread: signals stay as they were
        break

  def _on_signal(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      # The next Ctrl-C takes the default action: the process ends at once.
      signal.signal(signal.SIGINT, signal.SIG_DFL)
      # os.write, not print: the handler may run inside another write to stderr.
      os.write(2, STOPPING.encode())
      self._signalled = max(self._signalled, REASONS.index("SIGINT"))
    else:
      self._signalled = max(self._signalled, REASONS.index("SIGTERM"))

  def local(self) -> int:
    """This process's own request: an index into REASONS."""
    if self._signalled:
      return self._signalled
    return 2 if self._deadline is not None and time.time() >= self._deadline else 0

  def poll(self) -> str:
    """'' to go on, else why to stop. Every process must call it once per step."""
    if self._agree is None:
      return REASONS[self.local()]
    agreed = int(jax.device_get(self._pending)) if self._pending is not None else 0
    self._pending = self._agree(self.local())
    return REASONS[agreed]

  def close(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _all_reduce_max():
  """code -> a replicated device scalar: the maximum of every process's code (not fetched)."""
  mesh = Mesh(np.array(jax.devices()), ("processes",))
  spread, replicated = NamedSharding(mesh, P("processes")), NamedSharding(mesh, P())
  reduce = jax.jit(jnp.max, out_shardings=replicated)
  n = jax.local_device_count()

  def agree(code: int):
    local = np.full((n,), code, np.int32)
    return reduce(jax.make_array_from_process_local_data(spread, local))

  return agree
