"""Train an experiment file.

  python -m fmjax.main --config=experiments/pretrain_tiny.py[:arg] --workdir=DIR \
      [--config.train.steps=N ...]

Re-running the same command on the same workdir resumes from its latest
checkpoint. The config is checked before anything is compiled or written: a bad
field stops the run with a one-line error and leaves the workdir untouched.
"""

from __future__ import annotations

import difflib
import json
import os
import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file, e.g. experiments/pretrain_tiny.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and records.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir whose saved config differs in fields "
    "that change the run's results.")

# Fields that may differ when resuming: they change how a run is carried out,
# not what it computes.
RESUMABLE_CHANGES = ("train.steps", "train.progress", "train.log_every", "train.eval_every",
                     "train.sample_", "checkpoint.", "mesh.", "sharding.", "data.num_workers",
                     "data.data_dir", "model.remat", "model.scan_layers")


class UsageError(Exception):
  pass


def _flatten(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flatten(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def config_changes(old: dict, new: dict) -> list[str]:
  """'field: old -> new' for every leaf that differs and may not differ on resume."""
  a, b = dict(_flatten(old)), dict(_flatten(new))
  changed = []
  for key in sorted(set(a) | set(b)):
    if a.get(key) != b.get(key) and not key.startswith(RESUMABLE_CHANGES):
      changed.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
  return changed


def parse_flags(argv):
  """Parses flags; turns absl/ml_collections failures into one-line UsageErrors."""
  try:
    flags.FLAGS(argv)
  except flags.Error as e:
    raise UsageError(str(e).splitlines()[0]) from None
  except (AttributeError, KeyError) as e:
    bad = [a for a in argv if a.startswith("--config.")]
    raise UsageError(f"unknown config field in {' '.join(bad) or argv}: {e}; "
                     "check the spelling against fmjax/config.py") from None
  if not _WORKDIR.value:
    raise UsageError("--workdir is required, e.g. --workdir=runs/my_run")
  config_arg = flags.FLAGS["config"].config_filename if hasattr(
      flags.FLAGS["config"], "config_filename") else None
  path = (config_arg or "").split(":")[0]
  if not path:
    raise UsageError("--config is required, e.g. --config=experiments/pretrain_tiny.py")
  if not os.path.isfile(path):
    raise UsageError(f"--config={path}: no such experiment file")
  try:
    cfg = _CONFIG.value
    cfg.keys()
  except Exception as e:  # the experiment file itself failed
    raise UsageError(f"--config={path} could not be loaded: {type(e).__name__}: {e}") from None
  return cfg, _WORKDIR.value


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  try:
    cfg, workdir = parse_flags(argv)
  except UsageError as e:
    print(f"fmjax: {e}", file=sys.stderr)
    return 2

  import jax  # imported late: the number of fake CPU devices must be set first

  from fmjax import config as config_lib, loop, sizing

  if cfg.get("mesh") and cfg.mesh.get("cpu_devices"):
    jax.config.update("jax_num_cpu_devices", int(cfg.mesh.cpu_devices))
  try:
    cfg = sizing.resolve(cfg)  # the size dial and the horizon, as explicit fields
    config_lib.validate(cfg, jax.device_count())
    saved = os.path.join(workdir, "config.json")
    if os.path.exists(saved) and not _ALLOW_CONFIG_CHANGE.value:
      with open(saved) as f:
        changes = config_changes(json.load(f), cfg.to_dict())
      if changes:
        raise config_lib.ConfigError(
            f"{workdir} was made by a different config ({'; '.join(changes)}); use a new "
            "--workdir, or pass --allow_config_change to resume anyway")
    loop.run(cfg, workdir)  # raises ConfigError only before it writes anything
  except config_lib.ConfigError as e:
    print(f"fmjax: config error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
