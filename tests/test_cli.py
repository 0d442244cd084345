"""The command lines: --help everywhere, one `fmjax:` line and one exit-code table for every
failure, experiment-file arguments, sampling arguments, and --print_config.

Commands run as subprocesses where what is tested is the process (its exit
status, its stderr, its help); the rules behind them are called in this process.
"""

import importlib.util
import inspect
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from fmjax import config as config_lib, errors
from fmjax.runtime import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(module, *args, cwd=REPO):
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop(errors.TRACEBACK_ENV, None)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


def assert_one_line(stderr: str, status: int, returncode: int, needle: str = "") -> str:
  """stderr is exactly one line, `fmjax: ...` containing `needle`, and no traceback."""
  assert returncode == status, stderr
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(errors.PREFIX), stderr
  assert needle in lines[0], stderr
  return lines[0]


# -- --help on every command ------------------------------------------------------------

HELP = {
    "fmjax.main": ["--workdir", "--max_runtime", "--profile_steps", "allow_config_change", "print_config", "dry_run",
                   "--coordinator_address", "--num_processes", "--config.FIELD"],
    "fmjax.bench": ["--steps", "--warmup", "--json", "--config"],
    "fmjax.sample": ["--workdir", "--temperature", "--top_p", "--top_k", "--max_new_tokens",
                     "--step"],
    "fmjax.sweep": ["--config", "--workdir", "--print_commands", "--collect"],
    "fmjax.convert": ["to-hf", "from-hf"],
    "fmjax.task_eval": ["--workdir", "--examples"],
    "fmjax.eval": ["--workdir", "--suite", "--step", "--out"],
    "fmjax.export": ["--workdir", "--out"],
    "fmjax.launch_local": ["--processes", "--devices-per-process", "--module"],
    "fmjax.scaling": ["fit"],
}


@pytest.mark.parametrize("module", HELP)
def test_help_on_every_command(module):
  r = run(module, "--help")
  assert r.returncode == 0, r.stderr
  assert f"python -m {module}" in r.stdout, r.stdout  # the usage
  for flag in HELP[module]:
    assert flag in r.stdout, (flag, r.stdout)
  if module != "fmjax.scaling":
    assert errors.EXIT_CODES_HELP in r.stdout


@pytest.mark.parametrize("flag", ["-h", "--help", "--helpfull"])
def test_absl_help_flags_print_the_purpose_and_every_flag(flag, capsys):
  from absl import logging  # noqa: F401  (defines --verbosity, a library's flag)
  from fmjax import bench  # defines --steps
  with pytest.raises(SystemExit) as e:
    cli.parse_flags(["fmjax.bench", "--config=experiments/nope.py", flag], bench.__doc__)
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith("Measure what an experiment costs")
  assert "--steps: Timed steps" in out and "--process_id" in out
  assert ("--verbosity" in out) == (flag == "--helpfull")  # the libraries' flags too


@pytest.mark.parametrize("flag", ["-h", "--helpfull"])
def test_argparse_commands_take_the_same_help_flags(flag, capsys):
  from fmjax import sample
  with pytest.raises(SystemExit) as e:
    sample.main([flag])
  assert e.value.code == 0
  assert "--top_p" in capsys.readouterr().out


# -- one line and one table -------------------------------------------------------------

def test_errors_run_maps_each_failure_to_one_line_and_its_status(capsys, monkeypatch):
  monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)

  def raising(e):
    def main(argv):
      raise e
    return main

  cases = [(errors.UsageError("bad flag"), errors.USAGE, "fmjax: bad flag"),
           (errors.ConfigError("model.x=1 must be > 1"), errors.USAGE, "fmjax: config error: "),
           (errors.Failure("no checkpoint"), errors.FAILURE, "fmjax: no checkpoint"),
           (OSError(28, "No space left on device", "/w/ckpt"), errors.FAILURE,
            "fmjax: No space left on device: /w/ckpt"),
           (RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1GB"), errors.FAILURE,
            "fmjax: out of memory"),
           (StopIteration(), errors.FAILURE, "fmjax: unexpected StopIteration"),
           (KeyboardInterrupt(), errors.INTERRUPTED, "fmjax: interrupted")]
  for e, status, start in cases:
    assert errors.run(raising(e)) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(start), err
  assert errors.run(lambda argv: None) == errors.OK
  assert sorted(errors.EXIT_CODES) == [0, 1, 2, 130]


TINY = os.path.join(REPO, "experiments", "pretrain_tiny.py")
COMMAND_ERRORS = [  # (module, args, exit status, what the line names)
    ("fmjax.main", [f"--config={TINY}", "--workdir=w", "--no_such_flag"], 2, "no_such_flag"),
    ("fmjax.main", [f"--config={TINY}:anything", "--workdir=w"], 2,
     "pretrain_tiny.py takes no argument after ':' (got 'anything')"),
    ("fmjax.main", [f"--config={TINY}"], 2, "--workdir is required"),
    ("fmjax.bench", [f"--config={TINY}", "--steps=-1"], 2, "--steps=-1"),
    ("fmjax.sample", ["--workdir=w", "--temperature=-1"], 2, "--temperature=-1.0 must be >= 0"),
    ("fmjax.launch_local", ["--processes=0", "--", "--config=x"], 2, "--processes=0"),
]


@pytest.mark.parametrize("module,args,status,needle", COMMAND_ERRORS,
                         ids=[f"{m[6:]}:{a[-1]}" for m, a, _, _ in COMMAND_ERRORS])
def test_bad_command_lines_give_one_line_and_the_documented_status(tmp_path, module, args,
                                                                   status, needle):
  r = run(module, *args, cwd=tmp_path)
  assert_one_line(r.stderr, status, r.returncode, needle)
  assert os.listdir(tmp_path) == []  # nothing written


IN_PROCESS_ERRORS = [  # the same, through each command's main(argv)
    ("sample", ["--workdir=w", "--top_p=2"], 2, "--top_p=2.0 must be in (0, 1]"),
    ("sample", ["--workdir=w", "--max_new_tokens=0"], 2, "--max_new_tokens=0"),
    ("sample", ["--workdir=w", "--top_k=x"], 2, "invalid int value: 'x'"),
    ("sample", ["--workdir=missing"], 1, "no config.json in --workdir=missing"),
    ("sweep", [f"--config={REPO}/experiments/scaling_tiny.py:anything", "--workdir=w"], 2,
     "takes no argument after ':'"),
    ("launch_local", ["--processes=2"], 2, "give the command's arguments after --"),
    ("task_eval", ["--workdir=w", "--examples=0"], 2, "--examples=0 must be >= 1"),
    ("task_eval", ["--workdir=missing"], 1, "no config.json in --workdir=missing"),
    ("export", ["--workdir=w", "--out=w"], 2, "is the run's own workdir"),
    ("convert", ["to-hf", "--workdir=w", "--out=o", "--max_shard_gb=0"], 2,
     "--max_shard_gb=0.0 must be > 0"),
    ("convert", ["to-hf", "--workdir=w", "--out=o", "--step=-2"], 2, "--step=-2 must be >= 0"),
    ("convert", ["both-ways"], 2, "invalid choice: 'both-ways'"),
]


@pytest.mark.parametrize("command,args,status,needle", IN_PROCESS_ERRORS,
                         ids=[f"{c}:{a[-1]}" for c, a, _, _ in IN_PROCESS_ERRORS])
def test_bad_arguments_of_each_command(tmp_path, monkeypatch, capsys, command, args, status,
                                       needle):
  import importlib
  monkeypatch.chdir(tmp_path)
  main = importlib.import_module(f"fmjax.{command}").main
  code = main(args)
  assert_one_line(capsys.readouterr().err, status, code, needle)
  assert os.listdir(tmp_path) == []


# -- experiment files ---------------------------------------------------------------------

BROKEN = {
    "syntax.py": ("from fmjax import config\n\ndef get_config(:\n  return config.base()\n",
                  "syntax.py line 3: SyntaxError"),
    "raises.py": ("import os\nLIMIT = int(os.environ['FMJAX_NO_SUCH_VARIABLE'])\n",
                  "raises.py line 2: KeyError"),
    "empty.py": ("X = 1\n", "empty.py defines no get_config()"),
    "dict.py": ("def get_config():\n  return {'model': {}}\n", "returned dict, not a config"),
    "deep.py": ("from fmjax import config\n\ndef get_config():\n  c = config.base()\n"
                "  return c.model.no_such_section.x\n", "deep.py line 5: get_config raised"),
}


def write_broken(tmp_path):
  for name, (text, _) in BROKEN.items():
    (tmp_path / name).write_text(text)


@pytest.mark.parametrize("name", BROKEN)
def test_an_experiment_file_that_does_not_load_is_named_with_its_line(tmp_path, name):
  write_broken(tmp_path)
  with pytest.raises(errors.UsageError, match=re.escape(BROKEN[name][1])) as e:
    cli.load_experiment(str(tmp_path / name))
  assert "\n" not in str(e.value)


def test_the_command_line_reports_a_broken_experiment_in_one_line(tmp_path):
  write_broken(tmp_path)
  r = run("fmjax.main", f"--config={tmp_path / 'syntax.py'}", f"--workdir={tmp_path / 'w'}")
  assert_one_line(r.stderr, errors.USAGE, r.returncode, "syntax.py line 3: SyntaxError")
  assert not (tmp_path / "w").exists()


def test_an_argument_goes_only_to_a_get_config_that_takes_one(tmp_path):
  with pytest.raises(errors.UsageError, match=re.escape(
      "experiments/pretrain_tiny.py takes no argument after ':' (got 'anything')")):
    cli.load_experiment("experiments/pretrain_tiny.py:anything")
  with pytest.raises(errors.UsageError, match="takes no argument after ':' \\(got ''\\)"):
    cli.load_experiment("experiments/pretrain_tiny.py:")
  assert cli.load_experiment("experiments/bench_dense_1b.py:seq8192").data.seq_len == 8192
  assert cli.load_experiment("experiments/bench_dense_1b.py").data.seq_len == 2048
  assert cli.load_experiment("experiments/moe_vs_dense.py:dense").model.moe.n_routed_experts == 0
  needs = tmp_path / "needs.py"
  needs.write_text("from fmjax import config\n\ndef get_config(size):\n  return config.base()\n")
  with pytest.raises(errors.UsageError, match="needs an argument after ':'"):
    cli.load_experiment(str(needs))
  assert cli.load_experiment(f"{needs}:big").model.d_model == config_lib.base().model.d_model


@pytest.mark.parametrize("spec,accepted", [
    ("experiments/bench_dense_1b.py:seq9", "seq8192, seq32768"),
    ("experiments/moe_vs_dense.py:mixture", "'moe' or 'dense'"),
])
def test_an_unknown_argument_is_refused_with_the_accepted_ones(spec, accepted):
  with pytest.raises(errors.UsageError, match=re.escape(f"--config={spec}: ")) as e:
    cli.load_experiment(spec)
  assert accepted in str(e.value)


def test_no_shipped_experiment_ignores_its_argument():
  """A get_config that takes an argument uses it; the others take none."""
  import glob
  for path in glob.glob(os.path.join(REPO, "experiments", "*.py")):
    text = open(path).read()
    assert "del arg" not in text, path
    spec = importlib.util.spec_from_file_location("experiment", path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    if inspect.signature(loaded.get_config).parameters:
      assert re.search(r"\barg\b", text.split("def get_config", 1)[1]), path
    assert cli.load_experiment(path).model.d_model > 0  # loads without an argument


# -- sampling -----------------------------------------------------------------------------

def test_sampling_arguments_are_checked():
  from fmjax import sample
  sample.check_sampling(1, 0.0, 0, 1.0)  # greedy, no cuts
  sample.check_sampling(5, 0.7, 40, 0.9)
  for args, needle in [((1, -1.0, 0, 1.0), "--temperature=-1.0"),
                       ((1, float("nan"), 0, 1.0), "--temperature=nan"),
                       ((1, 1.0, 0, 2.0), "--top_p=2.0"), ((1, 1.0, 0, 0.0), "--top_p=0.0"),
                       ((1, 1.0, -3, 1.0), "--top_k=-3"), ((0, 1.0, 0, 1.0), "--max_new_tokens=0")]:
    with pytest.raises(errors.UsageError, match=re.escape(needle)):
      sample.check_sampling(*args)


def test_a_prompt_and_its_new_tokens_must_fit_the_trained_context():
  from fmjax import sample
  sample.check_lengths([10, 4], 22, 32)  # 10 + 22 = 32: exactly the context
  with pytest.raises(errors.UsageError, match="--prompt #1 \\(10 tokens\\) \\+ --max_new_tokens"
                     "=23 is 33 tokens, past the 32 .* use --max_new_tokens=22 or less"):
    sample.check_lengths([10, 4], 23, 32)
  with pytest.raises(errors.UsageError, match="--prompt #2 is 40 tokens, but the model was "
                     "trained on 32"):
    sample.check_lengths([3, 40], 1, 32)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
  """A workdir with config.json and (state-only) checkpoints at steps 3 and 5."""
  from fmjax.train import checkpoint
  workdir = tmp_path_factory.mktemp("sampled") / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(config_lib.to_json(config_lib.base()))
  with checkpoint.Checkpointer(str(workdir / "checkpoints"), keep=5, async_save=False) as c:
    for step in (3, 5):
      c.save(step, {"step": np.int32(step)}, force=True)
  return str(workdir)


def test_sample_step_names_the_checkpoints_the_run_has(checkpointed, capsys):
  from fmjax import sample
  assert sample.choose_step(os.path.join(checkpointed, "checkpoints"), None) == 5
  assert sample.main([f"--workdir={checkpointed}", "--step=4"]) == errors.FAILURE
  line = assert_one_line(capsys.readouterr().err, 1, 1, "--step=4: no checkpoint 4 in")
  assert line.endswith("it has steps 3, 5 (omit --step for the latest)")


def test_generation_reports_its_progress(monkeypatch):
  """generate calls `progress` with the count of tokens so far, each time one arrives
  (the compiled steps are replaced: only the loop around them is under test)."""
  from fmjax.nn import decoding
  monkeypatch.setattr(decoding, "init_cache", lambda spec, batch, length, mesh=None: None)
  monkeypatch.setattr(decoding, "_prefill_and_sample",
                      lambda params, cache, tokens, lengths, key, spec, sampling:
                      (np.full(len(lengths), 7, np.int32), cache))
  monkeypatch.setattr(decoding, "_step_and_sample",
                      lambda params, cache, tokens, positions, key, index, spec, sampling:
                      (np.full(len(positions), 7 + int(index), np.int32), cache))
  seen = []
  out = decoding.generate({}, None, [[1, 2, 3]], 5, progress=seen.append)
  assert out == [[1, 2, 3, 7, 8, 9, 10, 11]]
  assert seen == [1, 2, 3, 4, 5]
  seen.clear()
  assert decoding.generate({}, None, [[1]], 5, stop_id=9, progress=seen.append) == [[1, 7, 8, 9]]
  assert seen == [1, 2, 3]


# -- --print_config -----------------------------------------------------------------------

def test_parameter_table_matches_the_closed_form_counts():
  from fmjax import main as main_lib
  from fmjax.nn import cost
  from fmjax.scaling import sizing
  for name in ("pretrain_tiny", "pretrain_moe_tiny", "pretrain_mla_tiny"):
    cfg = sizing.resolve(cli.load_experiment(f"experiments/{name}.py"))
    table = main_lib.parameter_table(cfg)
    counts = cost.param_counts(cfg.model)
    assert sum(t for t, _ in table.values()) == counts["total"], name
    assert sum(a for _, a in table.values()) == counts["active"], name
    assert table["embedding"][0] == cfg.model.vocab_size * cfg.model.d_model
  moe = main_lib.parameter_table(sizing.resolve(
      cli.load_experiment("experiments/pretrain_moe_tiny.py")))
  assert moe["experts (routed)"][1] * 4 == moe["experts (routed)"][0]  # top-2 of 8


@pytest.mark.parametrize("flag,experiment", [("--print_config", "pretrain_moe_tiny"),
                                             ("--dry_run", "pretrain_tiny")])
def test_print_config_describes_the_run_and_writes_nothing(tmp_path, flag, experiment):
  r = run("fmjax.main", f"--config={REPO}/experiments/{experiment}.py", flag,
          "--workdir=w", "--config.train.steps=7", cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  out = r.stdout
  assert "# resolved config" in out and "steps: 7" in out
  for row in ("embedding", "attention", "norms", "unembedding", "total"):
    assert re.search(rf"^{row} +[\d,]+ +[\d,]+$", out, re.M), (row, out)
  assert ("experts (routed)" in out) == (experiment == "pretrain_moe_tiny")
  assert re.search(r"FLOPs per token \(training, causal attention\): [\d.e+]+", out)
  assert re.search(r"^parameters +[\d.]+ [KMG]?i?B$", out, re.M)
  assert re.search(r"^optimizer state +[\d.]+ [KMG]?i?B$", out, re.M)
  assert os.listdir(tmp_path) == []  # no workdir, nothing else


def test_print_config_of_a_bad_config_is_a_config_error(tmp_path):
  r = run("fmjax.main", f"--config={REPO}/experiments/pretrain_tiny.py", "--print_config",
          "--config.model.n_heads=5", cwd=tmp_path)
  assert_one_line(r.stderr, errors.USAGE, r.returncode, "config error: model.n_heads=5")
  assert r.stdout == ""
  assert os.listdir(tmp_path) == []


def test_the_profile_and_runtime_flags_set_their_config_fields():
  from fmjax import main
  cfg, workdir = main.parse_flags(["fmjax.main", "--config=experiments/pretrain_tiny.py",
                                   "--workdir=/tmp/x", "--profile_steps=2:4", "--max_runtime=5m"])
  assert (cfg.train.profile_steps, cfg.train.max_runtime, workdir) == ("2:4", "5m", "/tmp/x")
