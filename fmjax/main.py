"""Train an experiment file.

  python -m fmjax.main --config=experiments/pretrain_tiny.py[:arg] --workdir=DIR \
      [--config.train.steps=N ...]

Re-running the same command on the same workdir resumes from its latest
checkpoint. The config is checked before anything is compiled or written: a bad
field stops the run with a one-line error and leaves the workdir untouched.
Exit status: 0 done, 2 bad command line or config, 1 any other failure (workdir
in use, unreadable data, no usable checkpoint, a halt on non-finite steps).
SIGTERM, or the end of --max_runtime, stops the run after its current step with
a checkpoint and exit status 0; the same command resumes it.

Several processes (one per host) run the same command; see fmjax.runtime.distributed
for --coordinator_address, --num_processes and --process_id, and
fmjax.launch_local for several processes on one machine.
"""

from __future__ import annotations

import sys

from absl import flags

from fmjax.errors import ConfigError
from fmjax.runtime import cli
from fmjax.runtime.cli import UsageError
from fmjax.train.workdir import RESUMABLE_CHANGES, config_changes  # noqa: F401  (part of the CLI's API)

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and records.")
_MAX_RUNTIME = flags.DEFINE_string(
    "max_runtime", None, "Wall-clock budget (90m, 2h, 1h30m, 3600): when it runs out the run "
    "saves a checkpoint and exits 0, as on SIGTERM. Sets train.max_runtime.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir whose saved config differs in fields "
    "that change the run's results.")


def parse_flags(argv):
  """(config, workdir) from the command line, or a one-line UsageError."""
  cli.parse_flags(argv)
  if not _WORKDIR.value:
    raise UsageError("--workdir is required, e.g. --workdir=runs/my_run")
  cfg = cli.load_config()
  if _MAX_RUNTIME.value is not None:
    cfg.train.max_runtime = _MAX_RUNTIME.value
  return cfg, _WORKDIR.value


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  try:
    cfg, workdir = parse_flags(argv)
  except UsageError as e:
    print(f"fmjax: {e}", file=sys.stderr)
    return 2

  try:
    cli.start_jax(cfg)  # jax starts here: fake CPU devices and XLA flags are set first
  except ConfigError as e:
    print(f"fmjax: config error: {e}", file=sys.stderr)
    return 2
  return train(cfg, workdir, _ALLOW_CONFIG_CHANGE.value)


def train(cfg, workdir: str, allow_config_change: bool = False) -> int:
  """Resolves, validates and trains `cfg`; returns the exit status, printing a one-line
  error if not 0."""
  # Imported here, not at the top: the command restarts itself (host_malloc.reexec)
  # before anything heavy is imported.
  import jax

  from fmjax import validate
  from fmjax.train import loop

  try:
    cfg = validate.resolve(cfg, jax.device_count())
    loop.run(cfg, workdir, allow_config_change=allow_config_change)
  except ConfigError as e:  # raised before anything in the workdir is written
    print(f"fmjax: config error: {e}", file=sys.stderr)
    return 2
  except loop.RUN_ERRORS as e:
    print(f"fmjax: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  from fmjax.runtime import host_malloc
  host_malloc.reexec()
  sys.exit(main())
