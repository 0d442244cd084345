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

from fmjax import cli
from fmjax.cli import UsageError

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and records.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir whose saved config differs in fields "
    "that change the run's results.")

# Fields that may differ when resuming: they change how a run is carried out,
# not what it computes.
RESUMABLE_CHANGES = ("train.steps", "train.progress", "train.log_every", "train.eval_every",
                     "train.sample_", "checkpoint.", "mesh.", "sharding.", "data.num_workers",
                     "data.data_dir", "model.remat", "model.scan_layers")


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
  """(config, workdir) from the command line, or a one-line UsageError."""
  cli.parse_flags(argv)
  if not _WORKDIR.value:
    raise UsageError("--workdir is required, e.g. --workdir=runs/my_run")
  return cli.load_config(), _WORKDIR.value


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  try:
    cfg, workdir = parse_flags(argv)
  except UsageError as e:
    print(f"fmjax: {e}", file=sys.stderr)
    return 2

  from fmjax import config as config_lib

  try:
    cfg, _ = cli.start_jax(cfg)  # jax starts here: fake CPU devices and XLA flags are set first
    from fmjax import loop

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
