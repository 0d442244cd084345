"""fmjax as a model of lm-evaluation-harness (`lm_eval`): the model type `fmjax`.

lm-eval is optional (the `eval` extra: pip install -e ".[eval]"); only this
module imports it. Importing it registers the model type `fmjax`.

Command line. lm_eval finds only the models it ships, so run its command line
through this module, which registers fmjax first and then hands every argument
to lm_eval:

  python -m fmjax.evaluation.harness --model fmjax \\
      --model_args workdir=runs/pretrain_tiny,step=250 --tasks hellaswag,arc_easy \\
      --output_path runs/pretrain_tiny/lm_eval

With internet access, that is all the standard tasks need: lm_eval downloads
their datasets from the Hugging Face Hub into ~/.cache/huggingface on first
use (set HF_DATASETS_OFFLINE=1 afterwards to run from the cache). Without it,
define a task over local files and pass its directory with --include_path:

  task: my_choice                   # DIR/my_choice.yaml
  dataset_path: json
  dataset_kwargs: {data_files: {test: /data/items.jsonl}}
  test_split: test
  output_type: multiple_choice      # or loglikelihood_rolling, generate_until
  doc_to_text: "{{context}}"
  doc_to_choice: "{{choices}}"
  doc_to_target: "{{answer}}"
  metric_list: [{metric: acc}, {metric: acc_bytes}]

Python, on a workdir or on parameters in memory (a training run's, on its mesh):

  import lm_eval
  from fmjax.evaluation import harness
  lm_eval.simple_evaluate(model="fmjax", model_args="workdir=runs/pretrain_tiny",
                          tasks=["lambada_openai"])
  lm = harness.FmjaxLM(params=params, spec=spec, tokenizer=tok, seq_len=cfg.data.seq_len,
                       mesh=mesh)
  lm_eval.simple_evaluate(model=lm, tasks=["my_choice"], task_manager=
                          lm_eval.tasks.TaskManager(include_path="DIR"))

model_args: workdir (the run), step (default: the latest checkpoint), mesh (one:
one device, the default; run: the run's mesh over the devices present), rows
(rows of seq_len tokens per forward pass, default 8; a --batch_size above 1
takes its place), max_gen_toks (default 256) and seed (for sampling, default 0).

The requests are scored as fmjax.eval scores its own (fmjax.evaluation.scoring):
a context is BOS and its tokens, all requests are packed into rows of the
run's seq_len and go through one compiled forward pass per batch of rows, and
loglikelihood_rolling uses the harness's rolling windows (each token predicted
once, the last window with a full context). So an item scores the same here as
in fmjax.eval. generate_until decodes greedily unless the task asks for
do_sample or a temperature > 0, and stops at EOS or the first `until` string; a
context too long for seq_len - max_gen_toks loses its start, as the harness's
own models do.
"""

from __future__ import annotations

import sys

import jax
import lm_eval.models  # noqa: F401  (the shipped model types, before fmjax is added to them)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from fmjax.data import tokenizer as tokenizer_lib
from fmjax.evaluation import run, scoring, workdir as workdir_lib
from fmjax.nn import model, params as params_lib, sharding
from fmjax.nn.spec import ModelSpec
from fmjax.posttrain import lora


@register_model("fmjax")
class FmjaxLM(LM):
  """An fmjax model for lm_eval: a run's checkpoint (`workdir`), or parameters in memory."""

  def __init__(self, workdir: str | None = None, step=None, mesh="one", rows=8,
               max_gen_toks=256, seed=0, batch_size=None, *, params=None, spec=None,
               tokenizer=None, seq_len: int | None = None, **unused):
    super().__init__()
    del unused  # what lm_eval passes to every model (device, max_batch_size, ...)
    if params is None:
      if not workdir:
        raise ValueError("model_args needs workdir=RUN (the workdir of a training run)")
      cfg, params, _ = workdir_lib.load(workdir, None if step in (None, "") else int(step))
      params = {k: v for k, v in lora.merge(params, cfg.lora).items() if k != "head"}
      spec = ModelSpec.from_config(cfg)
      tokenizer = tokenizer_lib.from_config(cfg.data, cfg.model.vocab_size)
      seq_len = cfg.data.seq_len
      if mesh == "run":
        mesh = sharding.make_mesh(cfg.mesh)
        with jax.set_mesh(mesh):
          params = jax.device_put(params, params_lib.shardings(
              model.param_decls(cfg.model), mesh, cfg.sharding.params))
    if isinstance(mesh, str):
      if mesh not in ("one", "run"):
        raise ValueError(f"mesh={mesh!r} must be one or run")
      mesh = None
    self.model = run.Model(params, spec, tokenizer, int(seq_len), mesh)
    self.rows = int(batch_size) if str(batch_size).isdigit() and int(batch_size) > 1 else int(rows)
    self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)

  @property
  def tokenizer_name(self) -> str:
    return self.model.tokenizer.path

  def _pair(self, context: str, continuation: str):
    return scoring.encode_pair(self.model.tokenizer, context, continuation)

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether it is the greedy continuation) of each."""
    pairs = [self._pair(*r.args) for r in requests]
    out = self.model.score(pairs, self.rows)
    for r, result in zip(requests, out):
      self.cache_hook.add_partial("loglikelihood", r.args, result)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """log p(text) of each whole text, after BOS, in rolling windows of seq_len."""
    docs = [{"text": r.args[0]} for r in requests]
    windows, owner, _, _ = run.perplexity_requests(self.model.tokenizer, docs,
                                                   self.model.seq_len)
    totals = [0.0] * len(docs)
    for d, (logp, _) in zip(owner, self.model.score(windows, self.rows)):
      totals[d] += logp
    for r, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Each context's continuation, cut at the first of its `until` strings; requests with
    the same sampling settings decode together."""
    tok, seq_len = self.model.tokenizer, self.model.seq_len
    groups, out = {}, [None] * len(requests)
    for i, r in enumerate(requests):
      context, kwargs = r.args
      kwargs = dict(kwargs or {})
      until = kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      sample = kwargs.get("do_sample")
      temperature = float(kwargs.get("temperature", 1.0 if sample else 0.0))
      temperature = 0.0 if sample is False else temperature
      new = max(1, min(int(kwargs.get("max_gen_toks", self.max_gen_toks)), seq_len - 1))
      ids = [tok.bos_id] + tok.encode(context)
      ids = ids[-(seq_len - new):]
      groups.setdefault((temperature, new), []).append((i, ids, until))
    for (temperature, new), members in groups.items():
      generated = self.model.generate([ids for _, ids, _ in members], new, temperature,
                                      self.seed, batch=max(self.rows, 64))
      for (i, _, until), g in zip(members, generated):
        text = run.answer_text(tok, g)
        for stop in until:
          if stop and stop in text:
            text = text[:text.index(stop)]
        out[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out


def cli(argv=None) -> int:
  """lm_eval's command line, with the model type fmjax registered."""
  from lm_eval.__main__ import cli_evaluate  # only for the command line

  sys.argv = [sys.argv[0]] + (sys.argv[1:] if argv is None else list(argv))
  cli_evaluate()
  return 0


if __name__ == "__main__":
  sys.exit(cli())
