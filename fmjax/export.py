"""Export a run's parameters with its LoRA adapters merged into the base weights.

  python -m fmjax.export --workdir=runs/dpo_tiny --out=runs/dpo_tiny_merged

Writes OUT/checkpoints/<step> holding the model's parameters only (W + (alpha/r) A B
for every adapted weight; heads and adapters dropped) and OUT/config.json
(the run's, with lora.rank = 0 and objective next_token), so OUT can be another
run's checkpoint.init_from or objective.dpo.reference. A reward model keeps its
head and its objective: OUT is an objective.rl.reward_model as its run was.
"""

from __future__ import annotations

import os
import sys

import jax

from fmjax import errors
from fmjax.posttrain import lora, plan
from fmjax.train import checkpoint, records, trained_run


def merged_params(params, cfg) -> dict:
  """The model's parameters with the adapters merged in, without heads or adapters
  (a reward model's head is its output: it stays)."""
  kept = ("head",) if _is_reward_model(cfg) else ()
  return {k: v for k, v in lora.merge(params, cfg.lora).items()
          if k not in plan.ADDED or k in kept}


def _is_reward_model(cfg) -> bool:
  return cfg.objective.name == "reward_model"


def main(argv=None) -> int:
  return errors.run(_main, argv)


def _main(argv) -> int:
  parser = errors.ArgumentParser(prog="python -m fmjax.export",
                                 description=errors.command_help(__doc__))
  parser.add_argument("--workdir", required=True, help="the workdir of a (LoRA) training run")
  parser.add_argument("--out", required=True,
                      help="a new directory for the merged checkpoint and its config.json")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  out = os.path.abspath(os.path.expanduser(args.out))
  if out == os.path.abspath(os.path.expanduser(args.workdir)):
    parser.error(f"--out={args.out} is the run's own workdir; choose a new directory")
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    parser.error(f"--out={args.out} exists and is not empty; choose a new directory")
  cfg, _, params, step = trained_run.load(args.workdir, "fmjax")
  merged = jax.jit(lambda p: merged_params(p, cfg))(params)
  out_cfg = cfg.copy_and_resolve_references()
  out_cfg.lora.rank = 0
  out_cfg.objective.name = "reward_model" if _is_reward_model(cfg) else "next_token"
  os.makedirs(args.out, exist_ok=True)
  with checkpoint.Checkpointer(os.path.join(args.out, "checkpoints"), keep=1) as ckpt:
    ckpt.save(step, {"step": jax.numpy.asarray(step, jax.numpy.int32), "params": merged},
              force=True)
  records.write_json(os.path.join(args.out, "config.json"), out_cfg.to_dict())
  print(f"wrote {args.out}/checkpoints/{step}: merged parameters of {args.workdir}")
  return errors.OK


if __name__ == "__main__":
  sys.exit(main())
