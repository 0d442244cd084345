"""Workdir safety: a usable path, one trainer at a time, and only with the config that made it.

`check_path` and `create` turn a workdir that is a file, or that cannot be
created, into a one-line WorkdirError before anything is written.

`check_config` refuses to resume a workdir whose checkpoints were made by a
config that differs in a field that changes what the run computes, and lists
the differences. A workdir without a checkpoint holds nothing to protect (a
run that failed at its start, say out of memory): any config may start there,
and its config.json is replaced.

Resuming keeps the learning-rate schedule: its length (optimizer.decay_steps,
or train.steps when that is 0) is compared like a field, so resuming with more
train.steps under decay_steps=0, which would stretch the schedule, is refused
and listed. Set optimizer.decay_steps to the first run's length to keep its
schedule and train on at its final learning rate, or pass
--allow_config_change to stretch it.

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
from fmjax.errors import Failure

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


class WorkdirError(Failure):
  """The workdir is a file, or cannot be created or written: the message names the path."""


def check_path(workdir: str) -> None:
  """Raises WorkdirError if `workdir` or a directory above it is a file; writes nothing."""
  path = os.path.abspath(os.path.expanduser(workdir))
  above = path
  while not os.path.exists(above):
    above = os.path.dirname(above)
  if os.path.isdir(above):
    return
  if above == path:
    raise WorkdirError(f"--workdir={workdir} is an existing file, not a directory; give "
                       "another --workdir, or move that file away")
  raise WorkdirError(f"--workdir={workdir} cannot be created: {above} is a file, not a "
                     "directory; give another --workdir")


def create(workdir: str) -> bool:
  """Makes `workdir` (and the directories above it); returns whether it was made now."""
  check_path(workdir)
  if os.path.isdir(workdir):
    return False
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir} cannot be created ({e.strerror or e}: "
                       f"{e.filename or workdir}); give a --workdir where you can write") from None
  return True


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
  its default value in `new` is no change; nor is optimizer.decay_steps written
  out as the length it stood for (0 -> train.steps). A schedule stretched by a
  change of train.steps alone is `schedule_change`'s to report.
  """
  a, b = dict(_flatten(old)), dict(_flatten(new))
  defaults = dict(_flatten(base().to_dict()))
  same_schedule = schedule_length(old) == schedule_length(new)
  return [f"{key}: {a.get(key)!r} -> {b.get(key)!r}" for key in sorted(set(a) | set(b))
          if a.get(key) != b.get(key) and not key.startswith(RESUMABLE_CHANGES)
          and not (key not in a and key in defaults and b.get(key) == defaults[key])
          and not (key == "optimizer.decay_steps" and same_schedule)]


def schedule_length(config: dict):
  """The number of steps the learning-rate schedule spans (optimizer.decay_steps or train.steps)."""
  return config.get("optimizer", {}).get("decay_steps") or config.get("train", {}).get("steps")


def schedule_change(old: dict, new: dict) -> str | None:
  """How resuming `old` with `new` would change the length of the learning-rate schedule."""
  a, b = schedule_length(old), schedule_length(new)
  if a == b or a is None:
    return None
  return (f"learning-rate schedule over {a} -> {b} steps (optimizer.decay_steps="
          f"{new.get('optimizer', {}).get('decay_steps')!r}; 0 follows train.steps): set "
          f"optimizer.decay_steps={a} to keep the first run's schedule")


def check_config(workdir: str, config: dict, allow_change: bool = False,
                 has_checkpoint: bool = True):
  """Raises ConfigError if the checkpoints in `workdir` were made by a config that computes
  something else (or by a schedule of another length). Without a checkpoint nothing is
  checked: the run starts afresh and replaces config.json."""
  path = os.path.join(workdir, "config.json")
  if allow_change or not has_checkpoint or not os.path.exists(path):
    return
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} is unreadable ({type(e).__name__}: {e}); fix or remove it, "
                      "or pass --allow_config_change to overwrite it") from None
  changes = config_changes(saved, config)
  schedule = schedule_change(saved, config)
  if schedule and not any(c.startswith("optimizer.decay_steps:") for c in changes):
    changes.append(schedule)
  if changes:
    raise ConfigError(
        f"{workdir} was made by a different config ({'; '.join(changes)}); use a new "
        "--workdir, or pass --allow_config_change to resume anyway")
