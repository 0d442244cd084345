"""The MoE model of experiments/pretrain_moe_tiny.py against a dense model of equal active compute.

Both members share data, attention (MLA), optimizer, schedule and mesh. The
dense one replaces each MoE layer's 8 routed experts (top-2) and shared
expert, 3 x 128 = 384 active MLP columns, with a dense MLP of d_ff 384, so its
FLOPs per token are the MoE model's less the router's. Neither predicts
multiple tokens here, so only the MLPs differ. What differs is parameters:
3.44M (2.12M active) against 2.11M, at 12.68 against 12.66 MFLOP per
token for training.

  python -m fmjax.sweep --config=experiments/moe_vs_dense.py --workdir=runs/moe_vs_dense
  python -m fmjax.main --config=experiments/moe_vs_dense.py:dense --workdir=runs/dense_384

The sweep trains both (members `base`, the MoE model, and
`n_routed_experts0`) and writes records.jsonl with total and
active parameters, FLOPs and held-out losses side by side.

Measured (2026-11-23, 250 steps each): held-out loss 3.964 for the MoE model
against 3.968 for the dense one, within noise of each other at this length;
the MoE router went from the busiest expert at 3.0x the mean load (step 5)
to 1.10x (step 250) with nothing dropped. On the 8-device CPU mesh the MoE
step gives about 0.8x the dense step's tokens/s (tools/BENCHMARKS.md).
"""

import importlib.util
import os

DENSE = {"model.moe.n_routed_experts": 0}


def _moe_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain_moe_tiny.py")
  spec = importlib.util.spec_from_file_location("pretrain_moe_tiny", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(arg=None):
  """`moe` (default) or `dense`."""
  c = _moe_config()
  c.model.mtp_depth = 0  # compare the MLPs alone
  if arg == "dense":
    c.model.moe.n_routed_experts = 0
  elif arg not in (None, "", "moe"):
    raise ValueError(f"moe_vs_dense.py takes 'moe' or 'dense', not {arg!r}")
  return c


def sweep():
  return [{}, DENSE]
