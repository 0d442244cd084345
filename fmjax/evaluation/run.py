"""Running a loaded suite on parameters in memory: one record per entry.

`run_suite(params, spec, tokenizer, suite, mesh, seq_len=...)` takes the
parameters as they are (a checkpoint read back by fmjax.eval, or the live
parameters of a training run on its mesh) and returns a JSON-ready record per
entry:

  {"task", "kind", "data", "distribution": "id" | "ood", "examples",
   "metrics": {name: value}, "stderr": {name: standard error},
   "calibration": [bins] (multiple choice and generation), "seconds", "step"}

Metrics by kind:
  perplexity       loss (nats per predicted token), perplexity, bits_per_byte
                   (nats / ln 2 over the UTF-8 bytes of the text, so runs with
                   different tokenizers compare; absent for token sources),
                   tokens_per_byte
  multiple_choice  acc (highest summed log-probability), acc_per_token and
                   acc_per_byte (divided by the choice's tokens or bytes), ece
                   (confidence: the softmax over the choices' summed log-probs)
  generation       accuracy (greedy answers, checked by fmjax.data.tasks.verify),
                   ece (confidence: the probability of the greedy answer),
                   pass@k for each k of the settings (unbiased, over n samples)

`write_outputs` writes results.jsonl and the reliability diagrams; `format_table`
is the console table; `flat_metrics`, `summary` and `headline` are what a training
run records of a suite it runs (train.eval_suite).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import numpy as np

from fmjax.errors import Failure
from fmjax.data import task_batches, tasks
from fmjax.evaluation import metrics, plots, scoring
from fmjax.nn import decoding


@dataclasses.dataclass(frozen=True)
class Model:
  """What is evaluated: parameters the model reads (a LoRA run's merged first:
  fmjax.posttrain.lora.merge), on `mesh` if one is given, with its spec, its
  tokenizer and the context it was trained at."""
  params: Any
  spec: Any
  tokenizer: Any
  seq_len: int
  mesh: Any = None

  def score(self, requests, rows: int = 8) -> list[tuple[float, bool]]:
    """(summed log-probability, greedy) of each (context ids, continuation ids)."""
    return scoring.score(self.params, self.spec, requests, self.seq_len, rows=rows,
                         mesh=self.mesh)

  def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
               seed: int = 0, batch: int = 128) -> list[list[int]]:
    """The tokens generated after each prompt (up to and with EOS), in batches of a fixed
    size (the last one filled up with copies), so that each batch shape compiles once.
    At most seq_len tokens in all: a prompt that leaves no room is a Failure."""
    longest = max(len(p) for p in prompts)
    if longest >= self.seq_len:
      raise Failure(f"a prompt of {longest} tokens leaves no room to answer in the "
                    f"{self.seq_len}-token context the model was trained at")
    new = min(max_new_tokens, self.seq_len - longest)
    shards = scoring.batch_shards(self.mesh, self.spec)
    size = -(-min(batch, len(prompts)) // shards) * shards
    out = []
    for b in range(0, len(prompts), size):
      chunk = prompts[b:b + size]
      chunk = chunk + [chunk[-1]] * (size - len(chunk))
      generated = decoding.generate(self.params, self.spec, chunk, new, temperature,
                                    seed=seed + b, stop_id=self.tokenizer.eos_id,
                                    mesh=self.mesh)
      out += [g[len(p):] for p, g in zip(chunk, generated)]
    return out[:len(prompts)]


def run_suite(params, spec, tokenizer, suite, mesh=None, *, seq_len: int, rows: int = 8,
              generation_rows: int = 128, step: int | None = None, log=None) -> list[dict]:
  """One record per entry of `suite` (a loaded suite: fmjax.evaluation.suite.load_suite).

  `params` are the parameters the model reads (a LoRA run's merged first:
  fmjax.posttrain.lora.merge), on `mesh` if one is given; `seq_len` is the
  context the model was trained at. `rows` rows of seq_len tokens go through
  each scoring pass, `generation_rows` sequences through each decoding batch.
  `log(message)` hears of each entry as it starts.
  """
  m = Model(params, spec, tokenizer, seq_len, mesh)
  records = []
  for e in suite:
    if e.items is None:
      raise ValueError(f"{e.name}: the suite is not loaded; use suite.load_suite")
    if log:
      log(f"{e.name}: {e.kind} on {len(e.items)} examples")
    start = time.time()
    if e.kind == "perplexity":
      result = perplexity(m, e, rows)
    elif e.kind == "multiple_choice":
      result = multiple_choice(m, e, rows)
    else:
      result = generation(m, e, rows, generation_rows)
    records.append(dict(task=e.name, kind=e.kind, data=e.data, distribution=e.distribution,
                        settings=e.settings, step=step,
                        seconds=round(time.time() - start, 2), **result))
  return records


def check_context(suite, tokenizer, seq_len: int) -> None:
  """Failure naming the first generation entry with a prompt that leaves no room to answer
  in the `seq_len`-token context: said before a model is loaded or trained."""
  for e in suite:
    if e.kind == "generation" and e.items:
      longest = max(len(task_batches.render(tokenizer, item["prompt"], "")[0])
                    for item in e.items)
      if longest >= seq_len:
        raise Failure(f"suite entry {e.name}: a prompt of {longest} tokens leaves no room to "
                      f"answer in the {seq_len}-token context (data.seq_len); use shorter "
                      "prompts or a model trained at a longer context")


def perplexity_requests(tokenizer, documents, seq_len):
  """The rolling-window requests of each document ({"text"} or {"tokens"}), their owner
  document, and each document's predicted tokens and bytes (None for token documents)."""
  requests, owner, counts, sizes = [], [], [], []
  for d, doc in enumerate(documents):
    if "text" in doc:
      ids, prefix = tokenizer.encode(doc["text"]), tokenizer.bos_id
      size = len(doc["text"].encode("utf-8"))
    else:
      ids, prefix, size = doc["tokens"][1:], doc["tokens"][0], None
    windows = scoring.rolling_windows(ids, prefix, seq_len)
    requests += windows
    owner += [d] * len(windows)
    counts.append(len(ids))
    sizes.append(size)
  return requests, owner, counts, sizes


def perplexity(m: Model, e, rows: int) -> dict:
  requests, owner, counts, sizes = perplexity_requests(m.tokenizer, e.items, m.seq_len)
  nll = np.zeros(len(e.items))
  for d, (logp, _) in zip(owner, m.score(requests, rows)):
    nll[d] -= logp
  keep = np.asarray(counts) > 0
  loss, loss_se = metrics.ratio_and_stderr(nll[keep], np.asarray(counts)[keep])
  out = {"examples": int(keep.sum()), "tokens": int(sum(counts)),
         "metrics": {"loss": loss, "perplexity": math.exp(min(loss, 700))},
         "stderr": {"loss": loss_se}}
  if all(s is not None for s in sizes):
    bpb, bpb_se = metrics.ratio_and_stderr(nll[keep] / math.log(2), np.asarray(sizes)[keep])
    out["metrics"].update(bits_per_byte=bpb, tokens_per_byte=sum(counts) / sum(sizes))
    out["stderr"]["bits_per_byte"] = bpb_se
  return out


def multiple_choice(m: Model, e, rows: int) -> dict:
  delimiter = e.settings["delimiter"]
  requests = [scoring.encode_pair(m.tokenizer, item["context"], delimiter + choice)
              for item in e.items for choice in item["choices"]]
  scores = iter(m.score(requests, rows))
  lengths = iter(len(c) for _, c in requests)
  right = {"acc": [], "acc_per_token": [], "acc_per_byte": []}
  confidence = []
  for item in e.items:
    choices = item["choices"]
    lls = np.array([next(scores)[0] for _ in choices])
    n_tokens = np.array([next(lengths) for _ in choices], np.float64)
    n_bytes = np.array([len(c.encode("utf-8")) for c in choices], np.float64)
    for name, value in (("acc", lls), ("acc_per_token", lls / n_tokens),
                        ("acc_per_byte", lls / n_bytes)):
      right[name].append(float(np.argmax(value) == item["answer"]))
    probs = np.exp(lls - lls.max())
    confidence.append(float(probs.max() / probs.sum()))
  return _with_calibration({"examples": len(e.items)}, right, confidence, right["acc"],
                           e.settings["bins"])


def generation(m: Model, e, rows: int, generation_rows: int) -> dict:
  tok, s = m.tokenizer, e.settings
  prompts = [task_batches.render(tok, item["prompt"], "")[0] for item in e.items]

  def check(items, outputs):
    return [float(tasks.verify(item["task"], item["prompt"], answer_text(tok, out)))
            for item, out in zip(items, outputs)]

  greedy = m.generate(prompts, s["max_new_tokens"], 0.0, s["seed"], generation_rows)
  correct = check(e.items, greedy)
  confidence = [math.exp(logp) for logp, _ in m.score(list(zip(prompts, greedy)), rows)]
  values = {"accuracy": correct}
  if s["n"]:
    sampled = m.generate([p for p in prompts for _ in range(s["n"])], s["max_new_tokens"],
                         s["temperature"], s["seed"], generation_rows)
    right = np.array(check([i for i in e.items for _ in range(s["n"])], sampled))
    per_problem = right.reshape(len(e.items), s["n"]).sum(axis=1)
    for k in s["k"]:
      values[f"pass@{k}"] = [metrics.pass_at_k(s["n"], int(c), k) for c in per_problem]
  return _with_calibration({"examples": len(e.items)}, values, confidence, correct, s["bins"])


def answer_text(tokenizer, generated: list[int]) -> str:
  """The text of generated tokens, without the EOS."""
  return tokenizer.decode([t for t in generated if t != tokenizer.eos_id])


def _with_calibration(out, values, confidence, correct, bins) -> dict:
  out["metrics"], out["stderr"] = {}, {}
  for name, v in values.items():
    out["metrics"][name], out["stderr"][name] = metrics.mean_and_stderr(v)
  out["metrics"]["ece"] = metrics.expected_calibration_error(confidence, correct, bins)
  out["metrics"]["mean_confidence"] = float(np.mean(confidence))
  out["calibration"] = metrics.calibration_bins(confidence, correct, bins)
  return out


def format_table(records: list[dict]) -> str:
  """The records as a console table: one line per metric, in-distribution entries first,
  then the out-of-distribution ones under a heading of their own."""
  head = (f"{'task':<24} {'kind':<16} {'dist':<4} {'n':>5}  {'metric':<16} {'value':>9}  "
          f"{'± se':>7}")
  lines = [head]
  for dist, title in (("id", "in distribution"), ("ood", "out of distribution")):
    group = [r for r in records if r["distribution"] == dist]
    if group:
      lines.append(f"-- {title} " + "-" * (len(head) - len(title) - 4))
    lines += [_table_lines(r) for r in group]
  return "\n".join(lines)


# The one metric of each kind a console line quotes for a task.
HEADLINE = {"perplexity": "bits_per_byte", "multiple_choice": "acc", "generation": "accuracy"}


def flat_metrics(records: list[dict]) -> dict:
  """{"suite/TASK/METRIC": value} of every record: the keys of a training run's records
  (and its TensorBoard tags)."""
  return {f"suite/{r['task']}/{name}": value for r in records
          for name, value in r["metrics"].items()}


def summary(records: list[dict]) -> dict:
  """{task: kind, distribution, examples, metrics, stderr}: what a run's summary.json (and
  so a sweep's records) keeps of a suite's records."""
  keep = ("kind", "distribution", "examples", "metrics", "stderr", "step")
  return {r["task"]: {k: r[k] for k in keep} for r in records}


def headline(records: list[dict]) -> str:
  """One short line: the headline metric of each task."""
  parts = []
  for r in records:
    name = HEADLINE[r["kind"]]
    if name in r["metrics"]:
      parts.append(f"{r['task']} {name} {r['metrics'][name]:.3f}")
  return ", ".join(parts)


def _table_lines(r: dict) -> str:
  """One line per metric of a record, the task named on the first."""
  lines = []
  for i, (name, value) in enumerate(r["metrics"].items()):
    se = r["stderr"].get(name)
    left = (f"{r['task']:<24} {r['kind']:<16} {r['distribution']:<4} {r['examples']:>5}"
            if i == 0 else " " * 52)
    lines.append(f"{left}  {name:<16} {value:>9.4f}  {'' if se is None else f'{se:7.4f}'}")
  return "\n".join(lines)


def write_outputs(records: list[dict], out: str) -> list[str]:
  """Writes results.jsonl (one record a line) and reliability_<task>.png for each record
  with calibration bins into `out`; returns the paths written."""
  os.makedirs(out, exist_ok=True)
  paths = []
  for r in records:
    if r.get("calibration"):
      name = f"reliability_{r['task']}.png"
      title = f"{r['task']} ({r['distribution']}): ECE {r['metrics']['ece']:.3f}"
      plots.reliability_diagram(r["calibration"], title, os.path.join(out, name))
      r["plot"] = name
      paths.append(os.path.join(out, name))
  path = os.path.join(out, "results.jsonl")
  with open(path + ".tmp", "w") as f:
    for r in records:
      f.write(json.dumps(r, sort_keys=True) + "\n")
  os.replace(path + ".tmp", path)
  return [path] + paths
