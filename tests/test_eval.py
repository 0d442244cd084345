"""Evaluation: scores against hand-computed values, the mesh, lm_eval, the command, bad inputs."""

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, tree_hash
from fmjax import config as config_lib
from fmjax import eval as eval_cli
from fmjax.data import task_batches, tasks
from fmjax.errors import Failure, UsageError
from fmjax.evaluation import cloze, metrics, run, scoring, suite as suite_lib
from fmjax.nn import model, params as params_lib, sharding
from fmjax.nn.spec import ModelSpec
from fmjax.train import checkpoint

SEQ = 64
TEXT = ("In the beginning God created the heaven and the earth. Café, naïve — résumé. " * 6 +
        "And God said, Let there be light: and there was light.")


@pytest.fixture(scope="module")
def cfg(data_dir):
  c = tiny_config(vocab_size=512, tie_embeddings=False)
  c.data.update(data_dir=data_dir, seq_len=SEQ)
  return c


@pytest.fixture(scope="module")
def params(cfg):
  p = params_lib.init(model.param_decls(cfg.model), jax.random.key(0))
  return dict(p, unembed=p["unembed"] * 30)  # sharper than at init: clear-cut greedy choices


@pytest.fixture(scope="module")
def spec(cfg):
  return ModelSpec.from_config(cfg)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok):
  """JSON-lines data over which fmjax.eval and lm_eval must agree, and a suite over it."""
  d = tmp_path_factory.mktemp("eval_files")
  words = "the LORD God said unto Moses and Aaron in land of Egypt with all his house".split()
  rng = np.random.default_rng(0)
  with open(d / "mc.jsonl", "w") as f:
    for i in range(12):
      context = " ".join(rng.choice(words, int(rng.integers(3, 15))))
      choices = [" ".join(rng.choice(words, int(rng.integers(1, 6)))) for _ in range(3 + i % 2)]
      f.write(json.dumps({"context": context, "choices": choices, "answer": i % 3}) + "\n")
  with open(d / "ppl.jsonl", "w") as f:
    for text in (TEXT, "Jesus wept.", " ".join(rng.choice(words, 120))):
      f.write(json.dumps({"text": text}) + "\n")
  validation = tasks.Instructions("validation", size=12)
  with open(d / "gen.jsonl", "w") as f:
    for i in range(0, 12, 3):
      e = validation[i]
      f.write(json.dumps(dict(e, context=task_batches.USER + e["prompt"] +
                              task_batches.ASSISTANT)) + "\n")
  (d / "suite.yaml").write_text(
      "- {kind: multiple_choice, data: mc.jsonl}\n"
      "- {kind: perplexity, data: ppl.jsonl, name: ppl}\n"
      "- {kind: generation, data: gen.jsonl, settings: {max_new_tokens: 6}}\n")
  return d


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cfg, params):
  """A run's workdir: config.json and the parameters as checkpoint 0."""
  d = str(tmp_path_factory.mktemp("eval_run"))
  with open(os.path.join(d, "config.json"), "w") as f:
    f.write(config_lib.to_json(cfg))
  with checkpoint.Checkpointer(os.path.join(d, "checkpoints"), keep=1, async_save=False) as c:
    c.save(0, {"params": params})
  return d


@pytest.fixture(scope="module")
def command(workdir, files):
  """`python -m fmjax.eval` on the suite over the JSON-lines files, in this process."""
  out = os.path.join(workdir, "eval", "step_0")
  argv = ["--workdir", workdir, "--suite", str(files / "suite.yaml"), "--rows=2"]
  assert eval_cli.main(argv) == 0
  with open(os.path.join(out, "results.jsonl")) as f:
    return out, {r["task"]: r for r in map(json.loads, f)}


def naive_scores(params, spec, requests):
  """(log-likelihood, greedy) of each request, one forward pass over it alone (padded on
  the right to SEQ, which the causal positions before the padding never see)."""
  forward = jax.jit(model.forward, static_argnames="spec")
  out = []
  for context, continuation in requests:
    whole = list(context) + list(continuation)
    T = len(whole) - 1
    tokens = np.zeros((1, SEQ), np.int32)
    tokens[0, :T] = whole[:-1]
    logits = forward(params, tokens, np.ones((1, SEQ), np.int32), np.arange(SEQ)[None],
                     spec=spec)[0, :T]
    logp = np.asarray(jax.nn.log_softmax(logits))
    at = np.arange(T - len(continuation), T)
    targets = np.asarray(whole[1:])[at]
    out.append((float(logp[at, targets].sum()),
                bool((np.asarray(logits).argmax(-1)[at] == targets).all())))
  return out


def test_rolling_windows_predict_each_token_once_with_a_full_last_window():
  windows = scoring.rolling_windows(list(range(10)), -1, 4)
  assert windows == [([-1], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9])]
  assert scoring.rolling_windows([5, 6], -1, 4) == [([-1], [5, 6])]
  assert scoring.rolling_windows([], -1, 4) == []


def test_bits_per_byte_of_the_uniform_model(params, spec, tok, tmp_path):
  """All-zero unembedding: every token has probability 1/V, so the loss is ln V per token
  and the bits per byte log2(V) times the tokens per byte."""
  uniform = dict(params, unembed=jnp.zeros_like(params["unembed"]))
  (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
  entries = suite_lib.load_suite([dict(kind="perplexity", data=str(tmp_path / "text.txt"))])
  [record] = run.run_suite(uniform, spec, tok, entries, seq_len=SEQ)
  tokens, size = len(tok.encode(TEXT)), len(TEXT.encode("utf-8"))
  assert tokens > 2 * SEQ and size > len(TEXT)  # several windows; multi-byte characters
  V = spec.model.vocab_size
  m = record["metrics"]
  assert record["tokens"] == tokens and record["examples"] == 1
  assert m["loss"] == pytest.approx(math.log(V), rel=1e-6)
  assert m["perplexity"] == pytest.approx(V, rel=1e-5)
  assert m["bits_per_byte"] == pytest.approx(math.log2(V) * tokens / size, rel=1e-6)
  assert m["tokens_per_byte"] == pytest.approx(tokens / size)


def test_pass_at_k_against_its_closed_form():
  for n in range(1, 9):
    for c in range(n + 1):
      for k in range(1, n + 1):
        want = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert metrics.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
  assert metrics.pass_at_k(10, 3, 1) == pytest.approx(0.3)
  with pytest.raises(ValueError, match="k <= n"):
    metrics.pass_at_k(4, 1, 5)
  with pytest.raises(UsageError, match="pass@5 needs k <= n"):
    suite_lib.parse_suite([dict(kind="generation", data="arithmetic",
                                settings=dict(n=4, k=[1, 5]))])


def test_expected_calibration_error_of_a_constructed_set():
  # Four answers at confidence 0.95, three right (bin (0.9, 1]: accuracy 0.75, gap 0.2);
  # six at 0.25, three right (bin (0.2, 0.3]: accuracy 0.5, gap 0.25).
  confidence = [0.95] * 4 + [0.25] * 6
  correct = [1, 1, 1, 0] + [1, 0, 1, 0, 1, 0]
  assert metrics.expected_calibration_error(confidence, correct) == pytest.approx(
      0.4 * 0.2 + 0.6 * 0.25)
  bins = metrics.calibration_bins(confidence, correct)
  assert [b["count"] for b in bins] == [0, 0, 6, 0, 0, 0, 0, 0, 0, 4]
  assert bins[9]["accuracy"] == 0.75 and bins[2]["confidence"] == pytest.approx(0.25)
  assert metrics.expected_calibration_error([0.5, 0.5, 1.0], [1, 0, 1]) == 0.0


def test_multiple_choice_scores_equal_one_forward_per_choice(params, spec, tok, files):
  entries = suite_lib.load_suite([dict(kind="multiple_choice", data=str(files / "mc.jsonl"))])
  items = entries[0].items
  requests = [scoring.encode_pair(tok, it["context"], " " + c) for it in items
              for c in it["choices"]]
  naive = naive_scores(params, spec, requests)
  for share in (True, False):  # each context once, from its cache; or all packed in rows
    got = scoring.score(params, spec, requests, SEQ, rows=2, share_contexts=share)
    np.testing.assert_allclose([s for s, _ in got], [s for s, _ in naive], rtol=1e-5, atol=1e-4)
    assert [g for _, g in got] == [g for _, g in naive]
  assert len(scoring.pack(requests, SEQ)[0][0]) < len(requests) / 2  # several to a row

  [record] = run.run_suite(params, spec, tok, entries, seq_len=SEQ, rows=2)
  lls = iter(s for s, _ in naive)
  right = {"acc": [], "acc_per_token": [], "acc_per_byte": []}
  confidence = []
  for it in items:
    ll = np.array([next(lls) for _ in it["choices"]])
    tokens = np.array([len(tok.encode(" " + c)) for c in it["choices"]])
    size = np.array([len(c.encode()) for c in it["choices"]])
    for name, value in (("acc", ll), ("acc_per_token", ll / tokens), ("acc_per_byte", ll / size)):
      right[name].append(np.argmax(value) == it["answer"])
    confidence.append(np.exp(ll.max()) / np.exp(ll).sum())
  for name, values in right.items():
    assert record["metrics"][name] == pytest.approx(np.mean(values))
    assert record["stderr"][name] == pytest.approx(np.std(values, ddof=1) / np.sqrt(len(values)))
  assert record["metrics"]["mean_confidence"] == pytest.approx(np.mean(confidence), rel=1e-4)
  assert record["metrics"]["ece"] == pytest.approx(
      metrics.expected_calibration_error(confidence, right["acc"]), abs=1e-4)
  assert len(set(right["acc"])) == 2 or len(items) < 4  # a test that can tell right from wrong


class AnswerKey:
  """A stand-in model whose greedy answers are all right, whose k-th sample of problem i is
  right when k < i % 4 (of n = 4), and which gives every answer probability 0.5."""

  def __init__(self, tok, items, n):
    self.tokenizer, self.items, self.n = tok, items, n

  def generate(self, prompts, max_new_tokens, temperature, seed=0, batch=128):
    samples = len(prompts) // len(self.items)
    out = []
    for j in range(len(prompts)):
      e = self.items[j // samples]
      right = tasks.Instructions("validation", size=30)[self.items.index(e) * 3]["response"]
      ok = temperature == 0 or j % samples < (j // samples) % 4
      out.append(self.tokenizer.encode(right if ok else right + "0") + [self.tokenizer.eos_id])
    return out

  def score(self, requests, rows=8):
    return [(math.log(0.5), False)] * len(requests)


def test_generation_scores_verified_answers_with_pass_at_k_and_calibration(tok):
  [entry] = suite_lib.load_suite([dict(kind="generation", data="arithmetic",
                                       settings=dict(examples=10, n=4, k=[1, 2, 4]))])
  result = run.generation(AnswerKey(tok, entry.items, 4), entry, 8, 128)
  m = result["metrics"]
  assert m["accuracy"] == 1.0 and m["mean_confidence"] == 0.5 and m["ece"] == 0.5
  right = [i % 4 for i in range(10)]  # correct samples of each problem
  for k in (1, 2, 4):
    want = np.mean([1 - math.comb(4 - c, k) / math.comb(4, k) for c in right])
    assert m[f"pass@{k}"] == pytest.approx(want)


def test_one_device_and_the_8_device_mesh_agree(cfg, params, spec, tok, files):
  entries = suite_lib.load_suite([
      dict(kind="multiple_choice", data=str(files / "mc.jsonl")),
      dict(kind="perplexity", data=str(files / "ppl.jsonl")),
      dict(kind="generation", data="arithmetic",
           settings=dict(examples=4, n=2, k=[1, 2], max_new_tokens=5)),
  ])
  one = run.run_suite(params, spec, tok, entries, seq_len=SEQ, rows=2)
  mesh_cfg = cfg.copy_and_resolve_references()
  mesh_cfg.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(mesh_cfg.mesh)
  shardings = params_lib.shardings(model.param_decls(cfg.model), mesh, cfg.sharding.params)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(params, shardings)
  assert sharded["unembed"].sharding.num_devices == 8
  eight = run.run_suite(sharded, spec, tok, entries, mesh, seq_len=SEQ, rows=2)
  for a, b in zip(one, eight):
    assert a["examples"] == b["examples"] and a["metrics"].keys() == b["metrics"].keys()
    for name in a["metrics"]:
      assert b["metrics"][name] == pytest.approx(a["metrics"][name], rel=1e-5, abs=1e-6), name


def test_the_command_writes_records_a_table_and_reliability_diagrams(command, files, capsys):
  out, records = command
  assert sorted(records) == ["gen", "mc", "ppl"]
  mc, ppl, gen = records["mc"], records["ppl"], records["gen"]
  assert mc["examples"] == 12 and ppl["examples"] == 3 and gen["examples"] == 4
  assert set(mc["metrics"]) == {"acc", "acc_per_token", "acc_per_byte", "ece", "mean_confidence"}
  assert set(mc["stderr"]) == {"acc", "acc_per_token", "acc_per_byte"}
  assert {"loss", "bits_per_byte"} <= set(ppl["stderr"]) and gen["step"] == 0
  assert set(gen["metrics"]) == {"accuracy", "ece", "mean_confidence"}
  for name in ("mc", "gen"):
    with open(os.path.join(out, f"reliability_{name}.png"), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert sorted(os.listdir(out)) == ["reliability_gen.png", "reliability_mc.png", "results.jsonl"]


def test_lm_eval_adapter_equals_fmjax_eval(command, files, workdir, tok, params, spec, cfg,
                                           tmp_path, monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
  lm_eval = pytest.importorskip("lm_eval")
  from lm_eval.tasks import TaskManager
  from fmjax.evaluation import harness

  tasks_dir = tmp_path / "tasks"
  tasks_dir.mkdir()
  common = "dataset_path: json\ntest_split: test\n"
  data = lambda name: f"dataset_kwargs:\n  data_files:\n    test: {files / name}\n"  # noqa: E731
  (tasks_dir / "mc.yaml").write_text(
      "task: fm_mc\n" + common + data("mc.jsonl") + "output_type: multiple_choice\n"
      "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
      "metric_list:\n  - metric: acc\n  - metric: acc_bytes\n")
  (tasks_dir / "ppl.yaml").write_text(
      "task: fm_ppl\n" + common + data("ppl.jsonl") + "output_type: loglikelihood_rolling\n"
      "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: bits_per_byte\n")
  (tasks_dir / "gen.yaml").write_text(
      "task: fm_gen\n" + common + data("gen.jsonl") + "output_type: generate_until\n"
      "doc_to_text: '{{context}}'\ndoc_to_target: '{{response}}'\ntarget_delimiter: ''\n"
      "generation_kwargs:\n  until: ['<|user|>']\n  max_gen_toks: 6\n  do_sample: false\n"
      "metric_list:\n  - metric: exact_match\n")
  monkeypatch.chdir(tmp_path)  # lm_eval asks git for the commit of its working directory
  manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
  out = lm_eval.simple_evaluate(model="fmjax", model_args=f"workdir={workdir},rows=2",
                                tasks=["fm_mc", "fm_ppl", "fm_gen"], log_samples=True,
                                task_manager=manager)
  results, (_, records) = out["results"], command
  assert results["fm_mc"]["acc,none"] == records["mc"]["metrics"]["acc"]
  assert results["fm_mc"]["acc_bytes,none"] == records["mc"]["metrics"]["acc_per_byte"]
  assert results["fm_ppl"]["bits_per_byte,none"] == pytest.approx(
      records["ppl"]["metrics"]["bits_per_byte"], rel=1e-12)
  assert results["fm_gen"]["exact_match,none"] == records["gen"]["metrics"]["accuracy"]
  # The generated text itself: fmjax's greedy answers to the same prompts.
  samples = sorted(out["samples"]["fm_gen"], key=lambda s: s["doc_id"])
  gen = [json.loads(line) for line in open(files / "gen.jsonl")]
  m = run.Model(params, spec, tok, SEQ)
  answers = m.generate([task_batches.render(tok, e["prompt"], "")[0] for e in gen], 6, 0.0)
  assert [s["filtered_resps"][0] for s in samples] == [run.answer_text(tok, a) for a in answers]
  # The Python API on parameters in memory gives the same multiple-choice scores.
  lm = harness.FmjaxLM(params=params, spec=spec, tokenizer=tok, seq_len=SEQ, rows=2)
  again = lm_eval.simple_evaluate(model=lm, tasks=["fm_mc"], task_manager=manager)
  assert again["results"]["fm_mc"]["acc,none"] == records["mc"]["metrics"]["acc"]


def bad_input(tmp_path, workdir, case):
  """(command line, the expected line's text, status) of one bad input."""
  suite = tmp_path / "suite.yaml"
  if case == "no_checkpoint":
    empty = tmp_path / "run"
    empty.mkdir()
    shutil.copy(os.path.join(workdir, "config.json"), empty / "config.json")
    return ["--workdir", str(empty), "--suite", "quick"], "no checkpoint", 1, str(empty)
  if case == "unknown_kind":
    suite.write_text("- {kind: perplexity, data: kjv}\n- {kind: vibes, data: kjv}\n")
    return [str(suite)], "entry 2: unknown kind 'vibes'", 2, workdir
  if case == "missing_field":
    (tmp_path / "mc.jsonl").write_text('{"context": "a", "choices": ["b", "c"], "answer": 0}\n'
                                       '{"context": "a", "choices": ["b", "c"]}\n')
    suite.write_text("- {kind: multiple_choice, data: mc.jsonl}\n")
    return [str(suite)], "line 2 has no field 'answer'", 1, workdir
  if case == "k_over_n":
    suite.write_text("- {kind: generation, data: sorting, settings: {n: 2, k: [1, 4]}}\n")
    return [str(suite)], "pass@4 needs k <= n", 2, workdir
  (tmp_path / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me".encode("latin-1"))
  suite.write_text("- {kind: perplexity, data: latin1.txt}\n")
  return [str(suite)], "latin1.txt is not UTF-8", 1, workdir


@pytest.mark.parametrize("case", ["no_checkpoint", "unknown_kind", "missing_field", "k_over_n",
                                  "not_utf8"])
def test_each_bad_input_is_one_line_and_writes_nothing(case, workdir, tmp_path, capsys):
  argv, text, status, run_dir = bad_input(tmp_path, workdir, case)
  if argv[0] != "--workdir":
    argv = ["--workdir", run_dir, "--suite", argv[0]]
  before = tree_hash(run_dir), sorted(os.listdir(tmp_path))
  capsys.readouterr()
  assert eval_cli.main(argv) == status
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("fmjax: ") and text in lines[0], captured.err
  assert captured.out == ""
  assert (tree_hash(run_dir), sorted(os.listdir(tmp_path))) == before


def test_held_out_levels_are_harder_and_level_0_is_unchanged():
  validation = tasks.Instructions("validation")
  assert [validation[i]["prompt"] for i in range(3)] == [  # as drawn before levels existed
      "What is 55 + 49?", "Reverse the string: karlvu",
      "Sort in ascending order: 97, 54, 28, 84, 87"]
  for level in tasks.OOD_LEVELS:
    prefs = tasks.Preferences("validation", size=90, level=level)
    for i in range(90):
      e = prefs[i]
      assert tasks.verify(e["task"], e["prompt"], e["chosen"])
      assert not tasks.verify(e["task"], e["prompt"], e["rejected"])
      if e["task"] == "reversal":
        assert len(e["chosen"]) >= {1: 9, 2: 14}[level]  # longer than level 0's 3..8
      elif e["task"] == "sorting":
        assert e["chosen"].count(",") + 1 >= {1: 8, 2: 12}[level]  # longer than 3..7
      else:
        operands = [int(x) for x in e["prompt"][8:-1].split(" ")[::2]]
        assert max(operands) >= 100 if level == 1 else len(operands) == 3
  assert tasks.verify("arithmetic", "What is 2 + 3 * 4 - 5?", "9")
  with pytest.raises(ValueError, match="no level 3"):
    tasks.Instructions("validation", level=3)


def test_the_shipped_suites_and_scripture_cloze():
  default = suite_lib.parse_suite("default")
  kinds = {e.kind for e in default}
  assert kinds == set(suite_lib.KINDS)
  ood = [e.name for e in default if e.distribution == "ood"]
  assert sorted(ood) == sorted(f"{t}_level{lv}" for t in tasks.TASKS for lv in tasks.OOD_LEVELS)
  records = [dict(task=e.name, kind=e.kind, distribution=e.distribution, examples=1,
                  metrics={"acc": 0.5}, stderr={}) for e in default]
  table = run.format_table(records)
  assert table.index("in distribution") < table.index("arithmetic ") < table.index(
      "out of distribution") < table.index("arithmetic_level1")
  chapters = [("A 1", "one two three four five six seven eight nine\n"
                      "alpha beta gamma delta epsilon zeta eta theta iota kappa\n"
                      "a b c d e f g h"),
              ("A 2", "first verse of four\nsun moon star sky cloud rain snow wind fog mist")]
  items = cloze.items(chapters, 0, seed=1)
  assert len(items) == 3 and items == cloze.items(chapters, 0, seed=1)
  for it in items:
    assert len(it["choices"]) == cloze.CHOICES and len(set(it["choices"])) == cloze.CHOICES
    whole = it["context"].split("\n")[1] + " " + it["choices"][it["answer"]]
    assert whole in (chapters[0][1] + "\n" + chapters[1][1]).split("\n")


def test_the_addition_suite_draws_each_level_of_its_family_alone(tok):
  entries = suite_lib.load_suite("addition")
  assert [(e.name, e.distribution) for e in entries] == [
      ("addition", "id"), ("addition_level1", "ood"), ("addition_level2", "ood")]
  for e, digits in zip(entries, (2, 3, 4)):
    assert len(e.items) == 100 and all(it["task"] == "addition" for it in e.items)
    a, b = e.items[0]["prompt"].removeprefix("Add ").split(" + ")
    assert len(a) == len(b) == digits
    assert tasks.verify("addition", e.items[0]["prompt"], f"so {int(a) + int(b)}")
  run.check_context(entries, tok, 64)  # fits the RL experiments' context
  with pytest.raises(Failure, match="suite entry addition: a prompt of"):
    run.check_context(entries, tok, 8)
