"""Train an experiment file.

  python -m fmjax.main --config=experiments/pretrain_tiny.py[:arg] --workdir=DIR \
      [--config.train.steps=N ...]

Re-running the same command on the same workdir resumes from its latest
checkpoint. The config is checked before anything is compiled or written: a bad
field stops the run with a one-line error and leaves the workdir untouched.
"""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

from fmjax.workdir import RESUMABLE_CHANGES, config_changes  # noqa: F401  (part of the CLI's API)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file, e.g. experiments/pretrain_tiny.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and records.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir whose saved config differs in fields "
    "that change the run's results.")


class UsageError(Exception):
  pass


def parse_flags(argv):
  """Parses flags; turns absl/ml_collections failures into one-line UsageErrors."""
  try:
    flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and lines[1].startswith("Traceback"):  # the experiment file raised
      lines[0] += f" {lines[-1].strip()}"
    raise UsageError(lines[0]) from None
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

  if cfg.get("mesh") and cfg.mesh.get("cpu_devices"):
    jax.config.update("jax_num_cpu_devices", int(cfg.mesh.cpu_devices))
  return train(cfg, workdir, _ALLOW_CONFIG_CHANGE.value)


def train(cfg, workdir: str, allow_config_change: bool = False) -> int:
  """Validates and trains `cfg`; returns the exit status, printing a one-line error if not 0."""
  import jax

  from fmjax import config as config_lib, loop

  try:
    config_lib.validate(cfg, jax.device_count())
    loop.run(cfg, workdir, allow_config_change=allow_config_change)
  except config_lib.ConfigError as e:  # raised before anything in the workdir is written
    print(f"fmjax: config error: {e}", file=sys.stderr)
    return 2
  except loop.RUN_ERRORS as e:
    print(f"fmjax: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
