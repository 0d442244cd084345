"""What every fmjax command shares: the --config flag and starting jax for it.

  cfg = cli.parse_config(argv)   # flags -> config, or a one-line UsageError
  n_devices = cli.start_jax(cfg) # XLA flags, fake CPU devices, other processes
  cfg = validate.resolve(cfg, n_devices)  # the size dial and horizon, then every check

Commands define their own extra flags with absl and read them after
`parse_flags`. jax is imported only in `start_jax`: the number of fake CPU
devices and the XLA flags must be set before it starts its backends.
"""

from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

from fmjax.runtime import distributed  # also defines the multi-process flags every command takes
from fmjax.runtime import xla_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file, e.g. experiments/pretrain_tiny.py[:arg].")


class UsageError(Exception):
  """A bad command line. The message is one line."""


def parse_flags(argv) -> None:
  """Parses all flags; turns absl/ml_collections failures into one-line UsageErrors."""
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


def load_config():
  """The experiment config named by --config (after `parse_flags`)."""
  config_arg = getattr(flags.FLAGS["config"], "config_filename", None)
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
  return cfg


def parse_config(argv):
  parse_flags(argv)
  return load_config()


def start_jax(cfg) -> int:
  """Starts jax for `cfg`; returns the number of devices.

  Sets the accelerator's XLA flags (fmjax.runtime.xla_flags), joins the run's
  other processes if there are any (fmjax.runtime.distributed) and, if the
  config asks for it, sets the number of fake CPU devices (of this process).
  The command then resolves and checks the config (fmjax.validate.resolve).
  Raises ConfigError on bad multi-process settings.
  """
  platform = xla_flags.apply()
  import jax  # backends start after the XLA flags are set

  distributed.initialize(platform)
  if cfg.get("mesh") and cfg.mesh.get("cpu_devices"):
    jax.config.update("jax_num_cpu_devices", int(cfg.mesh.cpu_devices))
  return jax.device_count()
