"""What every fmjax command shares: the --config flag, --help, and starting jax for it.

  cfg = cli.parse_config(argv, __doc__)  # flags -> config, or a one-line UsageError
  n_devices = cli.start_jax(cfg) # XLA flags, fake CPU devices, other processes
  cfg = validate.resolve(cfg, n_devices)  # the size dial and horizon, then every check

Commands define their own extra flags with absl and read them after
`parse_flags`. jax is imported only in `start_jax`: the number of fake CPU
devices and the XLA flags must be set before it starts its backends.

An experiment file defines `get_config()`, or `get_config(arg)` if it takes the
argument after the colon in `--config=FILE:ARG` (`load_experiment`).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import traceback

import ml_collections
from absl import flags
from ml_collections import config_flags

from fmjax import errors
from fmjax.errors import UsageError  # noqa: F401  (raised for a bad command line; importable from here)
from fmjax.runtime import distributed  # also defines the multi-process flags every command takes
from fmjax.runtime import xla_flags

HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "-helpfull", "--helpshort", "-helpshort")


class _ExperimentParser(flags.ArgumentParser):
  """Reads --config=FILE[:ARG] with `load_experiment`, so a broken file is a UsageError."""

  def parse(self, argument):
    cfg = load_experiment(argument)
    cfg.lock()
    return cfg

  def flag_type(self):
    return "experiment file"


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file, e.g. experiments/pretrain_tiny.py[:arg].")
flags.FLAGS["config"].parser = _ExperimentParser()


def _error_line(path: str, e: BaseException) -> str:
  """'line N' of the innermost frame of `e` in the file `path` ('' if none)."""
  target = os.path.abspath(path)
  if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == target:
    return f"line {e.lineno}"
  frames = [f for f in traceback.extract_tb(e.__traceback__)
            if os.path.abspath(f.filename) == target]
  return f"line {frames[-1].lineno}" if frames else ""


def _refused(path: str, e: BaseException) -> bool:
  """True if `e` is get_config's own refusal of its argument: a ValueError raised in
  get_config itself."""
  tb = traceback.extract_tb(e.__traceback__)
  return (isinstance(e, ValueError) and bool(tb) and tb[-1].name == "get_config"
          and os.path.abspath(tb[-1].filename) == os.path.abspath(path))


def _takes_argument(get_config) -> bool:
  try:
    parameters = inspect.signature(get_config).parameters.values()
  except (TypeError, ValueError):
    return True
  return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
             for p in parameters)


def _needs_argument(get_config) -> bool:
  parameters = list(inspect.signature(get_config).parameters.values())
  return bool(parameters) and parameters[0].default is inspect.Parameter.empty \
      and parameters[0].kind != inspect.Parameter.VAR_POSITIONAL


def load_experiment(spec: str) -> ml_collections.ConfigDict:
  """The config of experiment `spec`, 'FILE' or 'FILE:ARG'.

  get_config() is called with ARG only if it takes an argument; an ARG for one that
  takes none is refused, as is a file that does not load (naming the line), has no
  get_config, or whose get_config returns no config. A ValueError that get_config
  itself raises refuses its argument: its message should list the accepted ones.
  Raises UsageError with one line.
  """
  path, colon, arg = spec.partition(":")
  if not path:
    raise UsageError("--config is required, e.g. --config=experiments/pretrain_tiny.py")
  if not os.path.isfile(path):
    raise UsageError(f"--config={path}: no such experiment file")
  try:
    module_spec = importlib.util.spec_from_file_location("fmjax_experiment", path)
    if module_spec is None:
      raise UsageError(f"--config={path} is not a Python file; an experiment is a .py file "
                       "that defines get_config()")
    module = importlib.util.module_from_spec(module_spec)
    # Registered before it runs, as an import would be: dataclasses look their module up.
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
  except UsageError:
    raise
  except BaseException as e:  # a file that calls sys.exit is as broken as one that raises
    if isinstance(e, KeyboardInterrupt):
      raise
    at = _error_line(path, e)
    what = f"{e.msg}" if isinstance(e, SyntaxError) else errors.one_line(e)
    raise UsageError(f"{path} {at + ': ' if at else ''}{type(e).__name__}: {what}") from None
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise UsageError(f"{path} defines no get_config(); an experiment file defines "
                     "get_config() and returns the config (see experiments/pretrain_tiny.py)")
  takes = _takes_argument(get_config)
  if colon and not takes:
    raise UsageError(f"{path} takes no argument after ':' (got {arg!r}); "
                     f"use --config={path}")
  if not colon and takes and _needs_argument(get_config):
    raise UsageError(f"{path} needs an argument after ':', e.g. --config={path}:VALUE "
                     "(see the file's docstring)")
  try:
    cfg = get_config(arg) if colon else get_config()
  except BaseException as e:  # as above
    if isinstance(e, KeyboardInterrupt):
      raise
    if _refused(path, e):
      raise UsageError(f"--config={spec}: {errors.one_line(e)}") from None
    at = _error_line(path, e)
    raise UsageError(f"{path} {at + ': ' if at else ''}get_config raised "
                     f"{type(e).__name__}: {errors.one_line(e)}") from None
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise UsageError(f"{path}: get_config() returned {type(cfg).__name__}, not a config; "
                     "return the ConfigDict (start from fmjax.config.base())")
  return cfg


_SHARED = {"fmjax.runtime.cli": "the experiment:",
           "fmjax.runtime.distributed": "several processes, one run (fmjax.runtime.distributed):"}


def _module_flags(module: str, title: str) -> str:
  """`title` and the help of every flag `module` defines."""
  text = flags.FLAGS.module_help(module).strip("\n")  # "module:\n  --flag: help ..."
  return title + "\n" + text.split("\n", 1)[-1]


def _help(doc: str | None, full: bool) -> str:
  """The command's purpose and usage, every flag with its help, and the exit statuses."""
  modules = flags.FLAGS.flags_by_module_dict()
  own = [m for m in modules if m not in _SHARED and not m.startswith("absl.")]
  parts = [errors.command_help(doc)] if doc else []
  parts += [_module_flags(m, "flags:") for m in own]
  parts.append(_module_flags("fmjax.runtime.cli", _SHARED["fmjax.runtime.cli"]) +
               "\n  --config.FIELD=VALUE: overrides one field of the experiment's config\n"
               "    (the fields and their defaults: fmjax/config.py).")
  parts.append(_module_flags("fmjax.runtime.distributed", _SHARED["fmjax.runtime.distributed"]))
  if full:
    parts += [_module_flags(m, f"{m}:") for m in modules if m not in _SHARED and m not in own]
  else:
    parts.append("--helpfull also lists the flags of the libraries fmjax uses.")
  parts.append(errors.EXIT_CODES_HELP)
  return "\n\n".join(parts)


def parse_flags(argv, doc: str | None = None) -> None:
  """Parses all flags; turns absl/ml_collections failures into one-line UsageErrors.

  -h, --help or --helpfull print the command's help (`doc`: its docstring) and
  exit with status 0, before anything else is read.
  """
  args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  asked = [a for a in args if a.split("=")[0] in HELP_FLAGS]
  if asked:
    try:
      print(_help(doc, full=any("helpfull" in a for a in asked)), flush=True)
    except BrokenPipeError:  # `--help | head`
      errors.silence_stdout()
    raise SystemExit(errors.OK)
  try:
    flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    raise UsageError(lines[0] if lines else type(e).__name__) from None
  except (AttributeError, KeyError) as e:
    bad = [a for a in argv if a.startswith("--config.")]
    raise UsageError(f"unknown config field in {' '.join(bad) or argv}: {e}; "
                     "check the spelling against fmjax/config.py") from None


def load_config():
  """The experiment config named by --config (after `parse_flags`)."""
  if flags.FLAGS["config"].value is None:
    raise UsageError("--config is required, e.g. --config=experiments/pretrain_tiny.py")
  return _CONFIG.value


def parse_config(argv, doc: str | None = None):
  parse_flags(argv, doc)
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

