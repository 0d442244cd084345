"""The PyTorch baseline of experiments/bench_dense_1b.py: the same model trained by transformers.

  python tools/bench_torch.py [--config=experiments/bench_dense_1b.py] [--config.x=y ...] \
      [--mode=eager|compile] [--compile_scope=model|layers] [--steps=10] [--warmup=2] \
      [--json=PATH]

Builds transformers' `LlamaForCausalLM` at the experiment's shape (its
config.json comes from fmjax's own export mapping, fmjax.hf.config_map, so the
two models have the same parameters), with SDPA attention, float32 master
weights and bf16 autocast, and trains it with fused AdamW (lr 3e-4, the
experiment's betas, weight decay and gradient clipping) on a fixed batch of
random tokens of the experiment's batch size and sequence length. `--mode=compile`
runs the model under `torch.compile` (the warm-up steps include compiling it):
the whole model, loss included, or with `--compile_scope=layers` each decoder
layer (compiled once for all of them: a fraction of the compile time).

The step time is the median of `--steps` steps after `--warmup`, each timed
to its completion on the device. Tokens/s and MFU use fmjax's FLOPs per token
(fmjax.nn.cost.flops_per_token, causal attention counted as half the T x T
square; `mfu_full_square` counts the whole square) and the same datasheet
peak as `python -m fmjax.bench`, so the figures compare one to one. Unlike
fmjax's benchmark batch, attention here is the plain causal mask with one
document per row (SDPA takes no segment ids); the record says so.

Prints a table on stderr and one JSON record on stdout (the field names of
fmjax.bench's record where they mean the same).
"""

from __future__ import annotations

import datetime
import inspect
import json
import math
import os
import statistics
import sys
import time

# The cost formulas import jax; it must not take the GPU from torch.
os.environ["JAX_PLATFORMS"] = "cpu"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import flags  # noqa: E402

from fmjax.runtime import cli  # noqa: E402

DEFAULT_CONFIG = os.path.relpath(os.path.join(REPO, "experiments", "bench_dense_1b.py"))
_MODE = flags.DEFINE_enum("mode", "eager", ["eager", "compile"],
                          "eager, or the model under torch.compile.")
_SCOPE = flags.DEFINE_enum("compile_scope", "model", ["model", "layers"],
                           "With --mode=compile: the whole model, or each decoder layer.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Steps run before timing starts (compile included).")
_LR = flags.DEFINE_float("lr", 3e-4, "AdamW learning rate.")
_JSON = flags.DEFINE_string("json", None, "Also write the JSON record to this file.")


def flops(m, seq_len: int) -> tuple[float, float]:
  """(FLOPs per token with causal attention counted as half the square, with the whole square)."""
  from fmjax.nn import cost
  if "attention" in inspect.signature(cost.flops_per_token).parameters:
    return (cost.flops_per_token(m, seq_len, attention="causal"),
            cost.flops_per_token(m, seq_len, attention="square"))
  square = cost.flops_per_token(m, seq_len)
  return square, square


def build(cfg, device):
  """(the model, its optimizer) at `cfg`'s shape, on `device`, float32."""
  import torch
  import transformers
  from fmjax.hf import config_map
  hf = transformers.LlamaConfig(**config_map.to_hf_config(cfg.model, cfg.data.seq_len))
  hf.use_cache = False
  torch.manual_seed(cfg.train.seed)
  with torch.device(device):
    model = transformers.LlamaForCausalLM._from_config(
        hf, attn_implementation="sdpa", dtype=torch.float32)
  model.train()
  o = cfg.optimizer
  kwargs = dict(lr=_LR.value, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
  try:
    opt = torch.optim.AdamW(model.parameters(), fused=True, **kwargs)
  except RuntimeError:  # a device without the fused kernel
    opt = torch.optim.AdamW(model.parameters(), foreach=True, **kwargs)
  return model, opt


def measure(cfg, mode: str, steps: int, warmup: int, scope: str = "model") -> dict:
  """The record of `steps` timed training steps of the torch model of `cfg`."""
  import torch
  import transformers
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  model, opt = build(cfg, device)
  params = [p for p in model.parameters()]
  clip = cfg.optimizer.clip_norm
  B, T, V = cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size
  gen = torch.Generator().manual_seed(0)
  tokens = torch.randint(1, V, (B, T), generator=gen).to(device)
  forward = model
  if mode == "compile" and scope == "layers":
    for layer in model.model.layers:
      layer.compile()
  elif mode == "compile":
    forward = torch.compile(model)
  sync = torch.cuda.synchronize if cuda else (lambda: None)

  def step():
    with torch.autocast(device, dtype=torch.bfloat16):
      loss = forward(input_ids=tokens, labels=tokens).loss
    loss.backward()
    if clip:
      torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  if cuda:
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  for _ in range(warmup):
    step()
  sync()
  warmup_s = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    loss = step()
    sync()
    times.append(time.perf_counter() - start)
  loss = float(loss)
  if not math.isfinite(loss):
    raise FloatingPointError(f"the benchmarked step's loss is {loss}")

  from fmjax.nn import cost
  kind = torch.cuda.get_device_name() if cuda else "cpu"
  sheet = cost.datasheet_peak(kind)
  per_token, per_token_square = flops(cfg.model, T)
  step_time = statistics.median(times)
  tokens_per_s = B * T / step_time
  mfu = lambda f: tokens_per_s * f / sheet[0] if sheet else None
  memory = None
  if cuda:
    memory = {"peak_bytes": torch.cuda.max_memory_allocated(),
              "reserved_bytes": torch.cuda.max_memory_reserved(),
              "source": "torch.cuda.max_memory_allocated"}
  return {
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "framework": "torch",
      "torch": torch.__version__,
      "transformers": transformers.__version__,
      "mode": mode,
      "compile_scope": scope if mode == "compile" else None,
      "platform": "gpu" if cuda else "cpu",
      "device_kind": kind,
      "devices": 1,
      "params": sum(p.numel() for p in params),
      "dtype": "bfloat16 autocast, float32 master weights",
      "attention_impl": "sdpa",
      "attention": "causal, one document per row",
      "optimizer": (f"AdamW fused, lr {_LR.value:g}, betas ({cfg.optimizer.b1}, "
                    f"{cfg.optimizer.b2}), weight decay {cfg.optimizer.weight_decay}, "
                    f"grad clip {clip}"),
      "batch_size": B,
      "seq_len": T,
      "tokens_per_step": B * T,
      "warmup": warmup,
      "warmup_s": warmup_s,
      "steps": len(times),
      "step_times_s": times,
      "step_time_s": step_time,
      "tokens_per_s": tokens_per_s,
      "flops_per_token": per_token,
      "flops_per_token_full_square": per_token_square,
      "model_flops_per_s": tokens_per_s * per_token,
      "peak_flops": sheet[0] if sheet else None,
      "peak_source": f"datasheet {sheet[1]} x1" if sheet else None,
      "mfu": mfu(per_token),
      "mfu_full_square": mfu(per_token_square),
      "memory_per_device": memory,
      "loss": loss,
  }


def table(r: dict) -> str:
  rows = [("device", f"{r['device_kind']} ({r['platform']}), torch {r['torch']}, "
                     f"transformers {r['transformers']}"),
          ("model", f"LlamaForCausalLM, {r['params']:,} parameters, {r['dtype']}, "
                    f"{r['mode']}" + (f" ({r['compile_scope']})" if r["compile_scope"] else "")),
          ("batch", f"{r['batch_size']} x {r['seq_len']} = {r['tokens_per_step']:,} tokens/step"
                    f" ({r['attention']})"),
          ("warm-up", f"{r['warmup']} steps in {r['warmup_s']:.2f} s"),
          ("step time", f"{r['step_time_s'] * 1e3:,.1f} ms (median of {r['steps']})"),
          ("tokens/s", f"{r['tokens_per_s']:,.0f}")]
  if r["mfu"] is not None:
    rows.append(("MFU", f"{r['mfu']:.1%} (causal half; {r['mfu_full_square']:.1%} counting "
                        f"the full T x T square) of {r['peak_source']}"))
  if r["memory_per_device"]:
    rows.append(("memory", f"peak {r['memory_per_device']['peak_bytes'] / 2**30:,.2f} GiB "
                           "allocated"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if not any(a.startswith("--config=") or a == "--config" for a in argv[1:]):
    argv.insert(1, f"--config={DEFAULT_CONFIG}")
  try:
    cfg = cli.parse_config(argv)
    if _STEPS.value < 1 or _WARMUP.value < 0:
      raise cli.UsageError("--steps must be >= 1 and --warmup >= 0")
  except cli.UsageError as e:
    print(f"fmjax: {e}", file=sys.stderr)
    return 2
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError as e:
    print(f"fmjax: the PyTorch baseline needs torch and transformers: {e}", file=sys.stderr)
    return 2
  if cfg.model.attention != "gqa" or cfg.model.moe.n_routed_experts:
    print("fmjax: the PyTorch baseline is a dense grouped-query (Llama) model; "
          "use a dense gqa experiment", file=sys.stderr)
    return 2
  record = measure(cfg, _MODE.value, _STEPS.value, _WARMUP.value, _SCOPE.value)
  record["command"] = " ".join(["python tools/bench_torch.py", *argv[1:]])
  print(table(record), file=sys.stderr)
  text = json.dumps(record, sort_keys=True)
  print(text)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
