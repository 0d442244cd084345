"""How fmjax fails: the errors every layer raises, and how every command reports them.

A bad setting raises `ConfigError`, a bad command line `UsageError`; each
message is one line, naming the value and the fix. Every command
(`python -m fmjax.<command>`) ends a failure with exactly one line on stderr
starting `fmjax: ` (PREFIX) and one of these exit statuses:

  0    done, or stopped cleanly with a checkpoint (SIGTERM, Ctrl-C, --max_runtime)
  1    a failure at run time: what the command read or did went wrong (a workdir
       in use, a missing checkpoint, unreadable data, a full disk, out of memory)
  2    bad usage: an unknown or malformed flag, a bad config value, an experiment
       file that does not load
  130  aborted at once (a second Ctrl-C), without a checkpoint

It lives apart from the schema (fmjax/config.py) and imports nothing of fmjax,
so that every layer can raise these without importing the schema.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

PREFIX = "fmjax: "

OK = 0
FAILURE = 1
USAGE = 2
INTERRUPTED = 130

EXIT_CODES = {OK: "done, or stopped cleanly with a checkpoint",
              FAILURE: "a failure at run time", USAGE: "bad usage or config",
              INTERRUPTED: "aborted at once, without a checkpoint"}
EXIT_CODES_HELP = "exit status: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items())

TRACEBACK_ENV = "FMJAX_TRACEBACK"  # set to 1 to see the traceback of an unexpected error


class ConfigError(ValueError):
  """A bad experiment config. The message is one line: the field, then the fix."""


class UsageError(Exception):
  """A bad command line. The message is one line."""


class Failure(Exception):
  """A command that cannot go on (exit status 1). The message is one line."""


def one_line(text) -> str:
  """`text` on one line: later lines joined to the first with ' / '."""
  return " / ".join(line.strip() for line in str(text).splitlines() if line.strip())


def report(message, status: int = FAILURE) -> int:
  """Prints the one `fmjax:` line of a failure to stderr; returns `status`."""
  print(PREFIX + one_line(message), file=sys.stderr, flush=True)
  return status


def silence_stdout() -> None:
  """Points stdout at /dev/null, so that flushing it at exit cannot fail again."""
  try:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  except (OSError, ValueError):
    pass


def out_of_memory(e: BaseException) -> bool:
  """True for a device or host allocation failure (XLA's RESOURCE_EXHAUSTED or MemoryError)."""
  return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e)


def run(main, argv=None) -> int:
  """`main(argv)`'s exit status, with every failure it raises reported in one line.

  UsageError and ConfigError are bad usage (2); Failure, OSError, running out of
  memory and sys.exit("message") fail at run time (1); KeyboardInterrupt is 130.
  Anything else is a bug: one line naming the exception, and its traceback with
  FMJAX_TRACEBACK=1. --help's SystemExit(0) passes through.
  """
  try:
    status = main(argv)
  except UsageError as e:
    return report(e, USAGE)
  except ConfigError as e:
    return report(f"config error: {e}", USAGE)
  except Failure as e:
    return report(e, FAILURE)
  except KeyboardInterrupt:
    return report("interrupted", INTERRUPTED)
  except SystemExit as e:  # sys.exit("message"): a failure; sys.exit(status) passes through
    if not isinstance(e.code, str):
      raise
    return report(e.code.removeprefix(PREFIX), FAILURE)
  except BrokenPipeError:  # the reader of stdout went away (`... | head`): nothing to tell it
    silence_stdout()
    return FAILURE
  except OSError as e:
    return report(f"{e.strerror or e}: {e.filename}" if e.filename else e, FAILURE)
  except Exception as e:  # one line for every failure; the traceback on request
    if os.environ.get(TRACEBACK_ENV):
      traceback.print_exc()
    if out_of_memory(e):
      return report(f"out of memory: {one_line(e)[:300]}; use a smaller batch or model, "
                    "or more devices", FAILURE)
    return report(f"unexpected {type(e).__name__}: {one_line(e)[:500]} "
                  f"(set {TRACEBACK_ENV}=1 for the traceback)", FAILURE)
  return OK if status is None else int(status)


class ArgumentParser(argparse.ArgumentParser):
  """argparse for fmjax commands: a usage error raises UsageError (one `fmjax:` line,
  exit status 2, through `run`) instead of argparse's usage text and exit."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    kwargs.setdefault("epilog", EXIT_CODES_HELP)
    super().__init__(*args, **kwargs)
    if self.add_help:  # as the absl commands take it
      self.add_argument("--helpfull", action="help", help=argparse.SUPPRESS)

  def error(self, message):
    raise UsageError(f"{message}; see {self.prog} --help")


def command_help(doc: str) -> str:
  """A command's purpose and usage: its docstring up to the end of the first indented
  block of example command lines."""
  lines, seen_block = [], False
  for line in doc.strip("\n").splitlines():
    if seen_block and line and not line.startswith(" "):
      break
    seen_block = seen_block or line.startswith("  ")
    lines.append(line)
  return "\n".join(lines).rstrip()
