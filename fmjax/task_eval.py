"""Held-out task accuracy: greedy answers to validation prompts, checked by recomputation.

  python -m fmjax.task_eval --workdir=runs/sft_tiny [--examples=300]

Renders each validation prompt of fmjax.data.tasks.Instructions with the chat
template (without its response), decodes greedily until EOS, and checks the
answer with `tasks.verify`, which recomputes it from the prompt. Prints, and
writes to WORKDIR/task_eval.json, the accuracy overall and per task.
"""

from __future__ import annotations

import json
import os
import sys

import jax

from fmjax import errors
from fmjax.data import task_batches, tasks, tokenizer as tokenizer_lib
from fmjax.nn import decoding
from fmjax.nn.spec import ModelSpec
from fmjax.posttrain import lora
from fmjax.train import records, trained_run


def task_accuracy(params, cfg, tokenizer, examples: int = 300, batch: int = 100,
                  max_new_tokens: int = 40) -> dict:
  """Accuracy of greedy answers to the first `examples` validation prompts."""
  params, spec = lora.merge(params, cfg.lora), ModelSpec.from_config(cfg)
  data = tasks.Instructions("validation", seed=cfg.data.seed)
  by_task = {t: [0, 0] for t in tasks.TASKS}
  for start in range(0, examples, batch):
    chunk = [data[i] for i in range(start, min(start + batch, examples))]
    prompts = [task_batches.render(tokenizer, e["prompt"], "")[0] for e in chunk]
    outputs = decoding.generate(params, spec, prompts, max_new_tokens, temperature=0.0,
                                stop_id=tokenizer.eos_id)
    for e, prompt, out in zip(chunk, prompts, outputs):
      answer = tokenizer.decode([t for t in out[len(prompt):] if t != tokenizer.eos_id])
      by_task[e["task"]][0] += tasks.verify(e["task"], e["prompt"], answer)
      by_task[e["task"]][1] += 1
  right = sum(r for r, _ in by_task.values())
  return {"accuracy": right / examples, "examples": examples,
          "by_task": {t: r / max(n, 1) for t, (r, n) in by_task.items()}}


def main(argv=None) -> int:
  return errors.run(_main, argv)


def _main(argv) -> int:
  parser = errors.ArgumentParser(prog="python -m fmjax.task_eval",
                                 description=errors.command_help(__doc__))
  parser.add_argument("--workdir", required=True,
                      help="the workdir of a training run (an SFT run, for the chat template)")
  parser.add_argument("--examples", type=int, default=300,
                      help="how many validation prompts to answer, >= 1 (default 300)")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  if args.examples < 1:
    parser.error(f"--examples={args.examples} must be >= 1")
  cfg, _, params, step = trained_run.load(args.workdir, "fmjax")
  params = jax.device_get(params)
  tok = tokenizer_lib.from_config(cfg.data, cfg.model.vocab_size)
  result = dict(task_accuracy(params, cfg, tok, args.examples), step=step)
  print(json.dumps(result, indent=2, sort_keys=True))
  records.write_json(os.path.join(args.workdir, "task_eval.json"), result)
  return errors.OK


if __name__ == "__main__":
  sys.exit(main())
