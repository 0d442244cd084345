"""Workdir safety: one trainer at a time, and only with the config that made it.

`check_config` refuses to resume a workdir whose saved config.json differs in
a field that changes what the run computes, and lists the differences.

The lock is `flock` on the workdir directory itself, so taking it writes
nothing into the workdir, and the kernel drops it when the holding process
dies, however it dies: a lock left by a killed run never blocks the next one.
A second trainer is refused with the holder's pid, read from /proc/locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os

from fmjax.config import ConfigError, base

# Fields that may differ when resuming: they change how a run is carried out
# (its length, logging, checkpointing, layout, what it does about a fault),
# not what it computes.
RESUMABLE_CHANGES = ("train.steps", "train.progress", "train.log_every", "train.eval_every",
                     "train.sample_", "train.nonfinite", "train.spike_", "train.max_runtime",
                     "checkpoint.",
                     "mesh.", "sharding.", "data.num_workers", "data.data_dir",
                     "model.remat", "model.scan_layers")


class WorkdirLocked(RuntimeError):
  """Another process is training into the same workdir."""


@contextlib.contextmanager
def lock(workdir: str):
  """Holds an exclusive lock on `workdir` (an existing directory) while the block runs."""
  fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder_pid(os.fstat(fd))
      who = f"process {holder}" if holder else "another process"
      raise WorkdirLocked(
          f"{workdir} is in use by {who}, which is training into it; wait for it to "
          "finish or stop it, or use another --workdir") from None
    yield
  finally:
    os.close(fd)  # releases the lock


def _holder_pid(st) -> int | None:
  """The pid holding a flock on the file `st` describes, from /proc/locks (Linux)."""
  inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
  try:
    with open("/proc/locks") as f:
      for line in f:
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode:
          return int(fields[4])
  except (OSError, ValueError):
    pass
  return None


def _flatten(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flatten(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def config_changes(old: dict, new: dict) -> list[str]:
  """'field: old -> new' for every leaf that differs and may not differ on resume.

  A field missing from `old` (a config saved before the field existed) that has
  its default value in `new` is no change.
  """
  a, b = dict(_flatten(old)), dict(_flatten(new))
  defaults = dict(_flatten(base().to_dict()))
  return [f"{key}: {a.get(key)!r} -> {b.get(key)!r}" for key in sorted(set(a) | set(b))
          if a.get(key) != b.get(key) and not key.startswith(RESUMABLE_CHANGES)
          and not (key not in a and key in defaults and b.get(key) == defaults[key])]


def check_config(workdir: str, config: dict, allow_change: bool = False):
  """Raises ConfigError if `workdir` was made by a config that computes something else."""
  path = os.path.join(workdir, "config.json")
  if allow_change or not os.path.exists(path):
    return
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} is unreadable ({type(e).__name__}: {e}); fix or remove it, "
                      "or pass --allow_config_change to overwrite it") from None
  changes = config_changes(saved, config)
  if changes:
    raise ConfigError(
        f"{workdir} was made by a different config ({'; '.join(changes)}); use a new "
        "--workdir, or pass --allow_config_change to resume anyway")
