"""`python -m fmjax.scaling plan`: the plan of a known law against the closed form."""

import json
import math
import os

import numpy as np
import pytest

from fmjax import validate
from fmjax.nn import cost
from fmjax.scaling import cli as scaling_cli
from fmjax.scaling import fit as fit_lib
from fmjax.scaling import plan as plan_lib
from fmjax.scaling import sizing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Chinchilla's fitted law (Hoffmann et al. 2022, Approach 3).
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
BUDGETS = (1e12, 2e12, 4e12, 8e12)


def law(N, D):
  return E + A / N**ALPHA + B / D**BETA


def closed_form(C):
  """N_opt = G (C/6)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)); D = C/(6N)."""
  G = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
  N = G * (C / 6) ** (BETA / (ALPHA + BETA))
  return N, C / (6 * N)


def write_records(path, c: float = 6.0, p: float = 1.0, seed: int = 0) -> str:
  """An IsoFLOP design of the known law: 5 sizes around each budget's optimum, each run
  spending its budget C at c N^p FLOPs per token."""
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for C in BUDGETS:
      n_opt, _ = closed_form(C)
      for k in (-2, -1, 0, 1, 2):
        N = n_opt * 2.0**k
        D = C / (c * N**p)
        loss = law(N, D) * (1 + 1e-4 * rng.standard_normal())
        f.write(json.dumps({"params": N, "tokens": D, "flops": C, "final_eval_loss": loss}) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  return write_records(tmp_path_factory.mktemp("plan") / "records.jsonl")


def test_plan_matches_the_closed_form(records):
  points = fit_lib.load_points(records)
  C = 4 * BUDGETS[-1]
  plan = plan_lib.make_plan(points, C, target_loss=law(*closed_form(C)), bootstrap=4)
  # The refits price any (N, D): the run's interval holds the law.
  loss, interval = plan_lib.predict_run(plan["approach3"], 2e5, 3e6)
  assert loss == pytest.approx(law(2e5, 3e6), rel=2e-3) and interval[0] <= loss <= interval[1]
  N, D = closed_form(C)
  a3 = plan["approach3"]
  assert a3["N"] == pytest.approx(N, rel=0.03)
  assert a3["D"] == pytest.approx(D, rel=0.03)
  assert a3["loss"] == pytest.approx(law(N, D), rel=1e-3)
  assert a3["N_interval"][0] <= a3["N"] <= a3["N_interval"][1]
  # Approach 2's power law from the parabolas' optima lands near it too.
  assert plan["approach2"]["N"] == pytest.approx(N, rel=0.15)
  # The budget that reaches the 4C optimum's loss is 4C.
  assert plan["target"]["C"] == pytest.approx(C, rel=0.05)
  # Without the largest budget, the fit still predicts its runs.
  h = plan["holdout"]
  assert h["C"] == pytest.approx(BUDGETS[-1]) and h["runs"] == 5
  assert h["mean_abs_rel_error"] < 0.01
  assert h["planned_loss"] == pytest.approx(law(*closed_form(BUDGETS[-1])), rel=0.01)


def test_plan_command_writes_a_runnable_experiment(records, tmp_path, capsys):
  out = tmp_path / "plan.py"
  C = 4 * BUDGETS[-1]
  code = scaling_cli.main(["plan", f"--records={records}", f"--flops={C}", "--bootstrap=0",
                           "--no-holdout_largest",
                           f"--template={os.path.join(ROOT, 'experiments', 'scaling_tiny.py')}",
                           f"--out={out}"])
  assert code == 0
  printed = capsys.readouterr().out
  assert "Approach 3" in printed and "Approach 2" in printed and str(out) in printed
  namespace = {}
  exec(compile(out.read_text(), str(out), "exec"), namespace)
  cfg = sizing.resolve(namespace["get_config"]())
  validate.validate(cfg, 1)
  N, D = closed_form(C)
  n = cost.param_counts(cfg.model)["total"]
  # The dial's nearest depth: within the step between two depths of N.
  assert abs(math.log(n / N)) < math.log(2.5)
  # trained for the budget: its tokens at its own FLOPs per token spend C
  tokens = cfg.train.steps * sizing.tokens_per_step(cfg)
  assert tokens * cost.flops_per_token(cfg.model, cfg.data.seq_len) == pytest.approx(C, rel=1e-3)
  assert cfg.optimizer.lr == 3e-3 and cfg.train.batch_size == 16  # the template's
  assert "Approach 3" in out.read_text()  # the plan's numbers are in its docstring
  # The run as written is priced at its own N and D (the dial's depth, the plan's tokens).
  with open(out.with_suffix(".json")) as f:
    run = json.load(f)["run"]
  assert run["params"] == n and run["tokens"] == tokens
  assert run["loss"] == pytest.approx(law(n, tokens), rel=2e-3)
  assert "the planned run's own loss" in printed


def test_the_budget_is_spent_at_the_runs_own_flops_per_token(tmp_path):
  """Records whose FLOPs are c N^p D (fmjax's count is not 6 N D at small sizes): the plan
  spends C at that count, N_opt = (alpha A C^beta / (p beta B c^beta))^(1/(alpha + p beta))."""
  c, p = 3.0, 1.1
  path = write_records(tmp_path / "records.jsonl", c, p, seed=1)
  C = 4 * BUDGETS[-1]
  plan = plan_lib.make_plan(fit_lib.load_points(path), C, bootstrap=0, holdout=False)
  assert plan["flops_per_token"]["c"] == pytest.approx(c, rel=1e-6)
  assert plan["flops_per_token"]["p"] == pytest.approx(p, rel=1e-6)
  N = (ALPHA * A * C**BETA / (p * BETA * B * c**BETA)) ** (1 / (ALPHA + p * BETA))
  a3 = plan["approach3"]
  assert a3["N"] == pytest.approx(N, rel=0.03)
  assert c * a3["N"]**p * a3["D"] == pytest.approx(C, rel=1e-9)  # the budget, spent
  # no other N on the budget does better
  for other in (0.8 * a3["N"], 1.25 * a3["N"]):
    assert law(other, C / (c * other**p)) > law(a3["N"], a3["D"])
