"""Held-out loss of a trained run's checkpoint at another context length and RoPE scaling.

Shows what RoPE scaling does before any continued training: evaluate a model
trained at 256 tokens on 1024-token sequences with and without YaRN.

  python tools/eval_context.py --workdir=runs/pretrain_tiny --seq_len=1024 --rope_scaling=none
  python tools/eval_context.py --workdir=runs/pretrain_tiny --seq_len=1024 --rope_scaling=yarn --factor=4
"""

from __future__ import annotations

import json
import os
import sys

import jax

from fmjax import errors
from fmjax.train import checkpoint, state as state_lib, step as step_lib
from fmjax import config as config_lib
from fmjax.nn import sharding
from fmjax.data import pipeline, tokenizer as tokenizer_lib


def _evaluate(argv):
  parser = errors.ArgumentParser(prog="python tools/eval_context.py", description=__doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seq_len", type=int, required=True)
  parser.add_argument("--rope_scaling", default="none", choices=config_lib.CHOICES["model.rope_scaling.kind"])
  parser.add_argument("--factor", type=float, default=1.0)
  parser.add_argument("--tokens", type=int, default=32768, help="held-out tokens to evaluate")
  args = parser.parse_args(argv)

  cfg = config_lib.base()
  with open(os.path.join(args.workdir, "config.json")) as f:
    cfg.update(json.load(f))
  trained_len = cfg.data.seq_len
  cfg.data.seq_len = args.seq_len
  cfg.model.rope_scaling.update(kind=args.rope_scaling, factor=args.factor,
                                original_seq_len=trained_len)
  cfg.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  s = state_lib.setup(cfg, mesh)
  ckpt = checkpoint.Checkpointer(os.path.abspath(os.path.join(args.workdir, "checkpoints")),
                                 keep=cfg.checkpoint.keep)
  if ckpt.latest_step() is None:
    raise errors.Failure(f"{ckpt.directory} has no checkpoint to evaluate; train the run first")
  params = ckpt.restore(ckpt.latest_step(), s.abstract_state)["params"]
  tok = tokenizer_lib.from_config(cfg.data, cfg.model.vocab_size)
  batch_size = 4
  batches = pipeline.eval_batches(cfg.data, tok, batch_size=batch_size,
                                  num_batches=max(args.tokens // (batch_size * args.seq_len), 1))
  if not batches:
    raise errors.Failure(f"the held-out data of {cfg.data.mixture!r} fills no batch of "
                         f"{batch_size} x {args.seq_len} tokens; evaluate at a shorter --seq_len")
  with jax.set_mesh(mesh):
    result = step_lib.evaluate(s, step_lib.make_eval_step(s), params, batches)
  print(json.dumps(dict(workdir=args.workdir, trained_seq_len=trained_len,
                        seq_len=args.seq_len, rope_scaling=args.rope_scaling,
                        factor=args.factor, **result)))
  return 0


def main(argv=None) -> int:
  return errors.run(_evaluate, argv)


if __name__ == "__main__":
  sys.exit(main())
