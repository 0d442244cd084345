"""Evaluation of a trained run: perplexity, multiple choice, generation with verifiers, calibration.

  python -m fmjax.eval --workdir=DIR [--suite=default] [--step=N] [--out=DIR]
  python -m fmjax.eval --workdir=DIR --suite=my_suite.yaml --mesh=run

Runs a suite (a shipped one: default, quick; or a YAML or Python file, see
fmjax/evaluation/suite.py) on one checkpoint of the run (default: the latest)
and writes, into --out (default DIR/eval/step_N/), results.jsonl with one
record per task (examples, metrics, standard errors) and a reliability
diagram (reliability_TASK.png) per multiple-choice and generation task; the
table goes to stdout. Out-of-distribution tasks (the held-out harder levels of
fmjax.data.tasks) are reported apart from in-distribution ones.

The suite and every data set it names are checked and read before the model is:
a bad suite (an unknown kind or setting, k > n for pass@k) or bad data (a task
file with a missing field, a text file that is not UTF-8), like a workdir
without a checkpoint, stops the command with one line and nothing written.

--mesh=run spreads the model and the batches over the run's mesh (its mesh
section, over the devices present); the default evaluates on one device.
lm-evaluation-harness tasks run through fmjax.evaluation.harness.
"""

from __future__ import annotations

import os
import sys

from fmjax import errors
from fmjax.errors import UsageError


def parse_args(argv):
  parser = errors.ArgumentParser(prog="python -m fmjax.eval",
                                 description=errors.command_help(__doc__))
  parser.add_argument("--workdir", required=True, help="the workdir of a training run")
  parser.add_argument("--suite", default="default",
                      help="a shipped suite (default, quick) or a .yaml/.py suite file "
                           "(default: default)")
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step to evaluate (default: the latest)")
  parser.add_argument("--out", default=None,
                      help="directory for the results (default: WORKDIR/eval/step_N)")
  parser.add_argument("--rows", type=int, default=8,
                      help="rows of seq_len tokens per scoring pass, >= 1 (default 8)")
  parser.add_argument("--mesh", choices=("one", "run"), default="one",
                      help="one: one device (default); run: the run's mesh over all devices")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  return errors.run(_main, argv)


def _main(argv) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.step is not None and args.step < 0:
    raise UsageError(f"--step={args.step} must be >= 0")
  if args.rows < 1:
    raise UsageError(f"--rows={args.rows} must be >= 1")

  # Imported only now: the arguments are checked, and --help answered, before jax loads.
  import jax

  from fmjax import convert, sample
  from fmjax.data import tokenizer as tokenizer_lib
  from fmjax.evaluation import run, suite
  from fmjax.hf.safetensors_files import FormatError
  from fmjax.nn import model, params as params_lib, sharding
  from fmjax.nn.spec import ModelSpec
  from fmjax.posttrain import lora
  from fmjax.train import checkpoint, trained_run

  entries = suite.parse_suite(args.suite)
  try:
    cfg = convert.load_workdir_config(args.workdir)
  except FormatError as e:
    raise errors.Failure(str(e)) from None
  if args.mesh == "run" and cfg.mesh.get("cpu_devices"):  # before jax starts its backends
    jax.config.update("jax_num_cpu_devices", int(cfg.mesh.cpu_devices))
  step = sample.choose_step(checkpoint.run_directory(args.workdir, cfg.checkpoint.get("root", "")),
                            args.step)
  entries = suite.load_suite(entries, cfg.data.data_dir)
  tok = tokenizer_lib.from_config(cfg.data, cfg.model.vocab_size)
  run.check_context(entries, tok, cfg.data.seq_len)

  cfg, _, params, step = trained_run.load(args.workdir, "fmjax", step)
  params = lora.merge(params, cfg.lora)  # a LoRA run is evaluated with its adapters merged in
  spec, mesh = ModelSpec.from_config(cfg), None
  if args.mesh == "run":
    mesh = sharding.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
      params = jax.device_put(params, params_lib.shardings(model.param_decls(cfg.model), mesh,
                                                           cfg.sharding.params))
  out = args.out or os.path.join(args.workdir, "eval", f"step_{step}")
  log = lambda message: print(f"eval: {message}", file=sys.stderr, flush=True)  # noqa: E731
  records = run.run_suite(params, spec, tok, entries, mesh, seq_len=cfg.data.seq_len,
                          rows=args.rows, step=step, log=log)
  paths = run.write_outputs(records, out)
  print(f"{args.workdir} step {step}, suite {args.suite}")
  print(run.format_table(records))
  print(f"wrote {paths[0]}" + (f" and {len(paths) - 1} reliability diagrams" if paths[1:] else ""))
  return errors.OK


if __name__ == "__main__":
  sys.exit(main())
