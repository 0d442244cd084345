"""Run, print or collect the sweep of an experiment file (fmjax/scaling/sweep.py).

  python -m fmjax.sweep --config=experiments/scaling_tiny.py --workdir=runs/scaling_tiny \\
      [--print_commands | --collect] [--config.FIELD=VALUE ...]

--config.FIELD=VALUE arguments apply to every member (e.g.
--config.checkpoint.root=gs://bucket/fmjax on a TPU pod); --config=FILE:ARG sweeps
the file's variant get_config(ARG). Exit status 0 when
every member finished, 1 if any failed (re-run the same command to retry
them), 2 for a bad command line or experiment file.
"""

from __future__ import annotations

import ast
import os
import shlex
import sys

from fmjax import errors


def parse_args(argv):
  """(options, {FIELD: VALUE} for every member) from the command line."""
  parser = errors.ArgumentParser(prog="python -m fmjax.sweep",
                                 description=errors.command_help(__doc__))
  parser.add_argument("--config", required=True,
                      help="experiment file with a sweep() beside its get_config(), "
                           "or FILE:ARG for its variant get_config(ARG)")
  parser.add_argument("--workdir", required=True,
                      help="one subdirectory per member, plus records.jsonl")
  parser.add_argument("--print_commands", action="store_true",
                      help="print one launch command per unfinished member instead of running")
  parser.add_argument("--collect", action="store_true",
                      help="only rebuild records.jsonl from finished members")
  args, rest = parser.parse_known_args(argv)
  common = {}
  for arg in rest:
    key, eq, value = arg.partition("=")
    if not (key.startswith("--config.") and eq):
      parser.error(f"unrecognized argument {arg}; only --config.FIELD=VALUE, for every member")
    try:
      common[key[len("--config."):]] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      common[key[len("--config."):]] = value
  if args.print_commands and args.collect:
    parser.error("--print_commands and --collect exclude each other")
  return args, common


def main(argv=None) -> int:
  return errors.run(_main, argv)


def _main(argv) -> int:
  args, common = parse_args(sys.argv[1:] if argv is None else argv)
  # Imported only now: the command line is checked, and --help answered, before jax loads.
  from fmjax.runtime import cli
  from fmjax.scaling import sweep

  cli.load_experiment(args.config)  # a file that does not load: one line naming it
  members = sweep.expand(args.config, common)
  if args.print_commands:
    for m in members:
      if not sweep.is_finished(m, args.workdir):
        print(shlex.join(sweep.command(args.config, m, args.workdir)))
    return errors.OK
  if args.collect:
    rows = sweep.collect(members, args.workdir)
    print(f"{len(rows)}/{len(members)} members finished; records in "
          f"{os.path.join(args.workdir, sweep.RECORDS)}")
    return errors.OK
  failed = sweep.run(args.config, args.workdir, members)
  if failed:
    raise errors.Failure(f"{failed} of {len(members)} sweep members failed; run the same "
                         "command again to retry them")
  return errors.OK


if __name__ == "__main__":
  sys.exit(main())
