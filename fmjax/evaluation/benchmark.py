"""How fast multiple-choice scoring runs: packed rows against one forward pass per choice.

  python -m fmjax.evaluation.benchmark --workdir=RUN [--items=200] [--rows=8] [--repeats=3]

Scores the scripture-cloze items (fmjax.evaluation.cloze, every choice a
request) with the run's model four ways, each run once to compile and then
timed `repeats` times, the fastest counting: as fmjax.eval does (each
question's context once, its choices from copies of its cache:
fmjax.evaluation.scoring), packed only (many requests per row, `rows` rows a
pass), one request per pass padded to seq_len (one compiled shape), and one
request per pass padded to the next power of two (a shape per length bucket,
less padding). Prints the requests' tokens per
second of each (tokens of context + choice, as if each were scored alone) and
the times against the first, and checks that all agree.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.data import tokenizer as tokenizer_lib
from fmjax.evaluation import scoring, suite, workdir as workdir_lib
from fmjax.nn.spec import ModelSpec
from fmjax.posttrain import lora


def one_by_one_bucketed(params, spec, requests, seq_len: int):
  """One forward pass per request, padded to the next power of two (at least 16)."""
  out = []
  for context, continuation in requests:
    n = min(len(context) + len(continuation) - 1, seq_len)
    bucket = min(seq_len, max(16, 1 << (n - 1).bit_length()))
    arrays, placed = scoring.pack([(context, continuation)], bucket)
    logp, _ = scoring.token_scores(params, *map(jnp.asarray, arrays), spec=spec)
    _, a, e = placed[0]
    out.append(float(np.asarray(logp)[0, a:e].sum(dtype=np.float64)))
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fmjax.evaluation.benchmark",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--items", type=int, default=200)
  parser.add_argument("--rows", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3, help="timed runs; the fastest counts")
  args = parser.parse_args(argv)
  cfg, params, step = workdir_lib.load(args.workdir)
  params = lora.merge(params, cfg.lora)
  spec, seq_len = ModelSpec.from_config(cfg), cfg.data.seq_len
  tok = tokenizer_lib.from_config(cfg.data, cfg.model.vocab_size)
  entry = suite.load_suite([dict(kind="multiple_choice", data="kjv_cloze",
                                 settings=dict(examples=args.items))], cfg.data.data_dir)[0]
  requests = [scoring.encode_pair(tok, item["context"], " " + choice)
              for item in entry.items for choice in item["choices"]]
  tokens = sum(min(len(c) + len(x) - 1, seq_len) for c, x in requests)
  rows = len(scoring.pack(requests, seq_len)[0][0])
  print(f"{args.workdir} step {step}: {len(requests)} requests ({len(entry.items)} items), "
        f"{tokens} tokens, {tokens / len(requests):.1f} per request; packed into {rows} rows "
        f"of {seq_len}; {jax.devices()[0].platform}, {jax.device_count()} device(s)")

  def timed(fn):
    result, best = fn(), float("inf")  # the first run compiles every shape it needs
    for _ in range(args.repeats):
      start = time.perf_counter()
      fn()
      best = min(best, time.perf_counter() - start)
    return result, best

  runs = {
      "shared contexts + packed (fmjax.eval)":
          lambda: [p for p, _ in scoring.score(params, spec, requests, seq_len, rows=args.rows)],
      "packed only": lambda: [p for p, _ in scoring.score(
          params, spec, requests, seq_len, rows=args.rows, share_contexts=False)],
      "one per pass, padded to seq_len":
          lambda: [p for p, _ in scoring.score_one_by_one(params, spec, requests, seq_len)],
      "one per pass, padded to a power of two":
          lambda: one_by_one_bucketed(params, spec, requests, seq_len),
  }
  results = {name: timed(fn) for name, fn in runs.items()}
  first, t_first = results[next(iter(runs))]
  for name, (scores, t) in results.items():
    np.testing.assert_allclose(scores, first, rtol=1e-4, atol=1e-3)
    print(f"{name:<40} {t:8.2f} s  {tokens / t:10.0f} tokens/s  {t / t_first:6.1f}x the "
          "time of the first")
  return 0


if __name__ == "__main__":
  sys.exit(main())
