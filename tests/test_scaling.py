"""Scaling-law fits recover known laws from synthetic points."""

import json
import os

import numpy as np
import pytest

from fmjax.scaling import cli as scaling_cli, fit as scaling

# Chinchilla's published fit (Hoffmann et al. 2022, Approach 3).
TRUE = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def isoflop_design(budgets, sizes):
  N, D = [], []
  for C in budgets:
    for n in sizes:
      N.append(n)
      D.append(C / (6 * n))
  return np.array(N), np.array(D)


def draw(noise, seed=0, budgets=np.geomspace(1e17, 1e20, 4), sizes=np.geomspace(1e7, 3e9, 6)):
  N, D = isoflop_design(budgets, sizes)
  L = scaling.ParametricFit(**TRUE, objective=0.0).predict(N, D)
  L = L * np.exp(np.random.default_rng(seed).normal(0, noise, len(L)))
  return N, D, L, 6 * N * D


def test_parametric_fit_recovers_known_law_within_bootstrap_intervals():
  N, D, L, _ = draw(noise=0.003, budgets=np.geomspace(1e17, 1e20, 5),
                    sizes=np.geomspace(1e7, 3e9, 8))
  fit = scaling.fit_parametric(N, D, L, bootstrap=30, confidence=0.95)
  for name in scaling.PARAMETRIC_NAMES:
    lo, hi = fit.intervals[name]
    assert lo <= TRUE[name] <= hi, (name, TRUE[name], fit.intervals[name])
  assert abs(fit.E - TRUE["E"]) < 0.05
  assert abs(fit.alpha - TRUE["alpha"]) < 0.03 and abs(fit.beta - TRUE["beta"]) < 0.03


def test_noise_free_fit_is_exact_and_prediction_error_is_small():
  N, D, L, C = draw(noise=0.0)
  fit = scaling.fit_parametric(N, D, L)
  for name in scaling.PARAMETRIC_NAMES:
    assert fit.__dict__[name] == pytest.approx(TRUE[name], rel=2e-2), name
  g = scaling.goodness(fit, N, D, L)
  assert g["r2_log"] > 0.9999 and g["mean_abs_rel_error"] < 1e-3
  lobo = scaling.leave_one_budget_out(N, D, L, C)
  assert len(lobo["per_budget"]) == 4
  assert lobo["mean_abs_rel_error"] < 5e-3


def test_grid_of_starts_finds_the_optimum_a_single_start_misses():
  N, D, L, _ = draw(noise=0.003)
  single = {k: (v,) for k, v in dict(a=25.0, b=0.0, e=0.0, alpha=0.0, beta=0.0).items()}
  one = scaling.fit_parametric(N, D, L, grid=single)
  grid = scaling.fit_parametric(N, D, L)
  assert grid.objective < one.objective / 10
  assert abs(one.E - TRUE["E"]) > 0.5  # the single start lands somewhere wrong
  assert abs(grid.E - TRUE["E"]) < 0.05


def test_isoflop_fit_recovers_the_optimal_size_exponent():
  law = scaling.ParametricFit(**TRUE, objective=0.0)
  budgets = np.geomspace(1e17, 1e21, 5)
  # Each budget sweeps a decade either side of its optimum, as an IsoFLOP design does.
  N = np.concatenate([float(scaling.compute_optimal(law, c)["N"]) * np.geomspace(0.1, 10, 9)
                      for c in budgets])
  C = np.repeat(budgets, 9)
  D = C / (6 * N)
  iso = scaling.fit_isoflop(N, D, law.predict(N, D), C)
  a = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])  # N_opt ~ C^a under L(N, D)
  assert iso.N_exponent == pytest.approx(a, abs=0.01)
  assert iso.N_exponent + iso.D_exponent == pytest.approx(1.0, abs=1e-9)  # D = C / 6N
  assert len(iso.budgets) == 5


def test_compute_optimal_matches_brute_force_along_the_budget():
  fit = scaling.ParametricFit(**TRUE, objective=0.0)
  C = 1e21
  n = np.geomspace(1e7, 1e12, 200_001)
  brute = n[np.argmin(fit.predict(n, C / (6 * n)))]
  opt = scaling.compute_optimal(fit, C)
  assert float(opt["N"]) == pytest.approx(brute, rel=1e-3)
  assert float(opt["tokens_per_param"]) == pytest.approx(C / (6 * brute) / brute, rel=3e-3)


def test_compute_law_recovers_exponent():
  C = np.geomspace(1e15, 1e21, 12)
  L = 1.8 + 2000.0 / C ** 0.15
  fit = scaling.fit_compute(C, L)
  assert fit.E == pytest.approx(1.8, rel=1e-2)
  assert fit.gamma == pytest.approx(0.15, rel=2e-2)


def test_cli_fits_a_table_and_writes_plots(tmp_path, capsys):
  N, D, L, C = draw(noise=0.003)
  path = tmp_path / "records.jsonl"
  with open(path, "w") as f:
    for n, d, l, c in zip(N, D, L, C):
      f.write(json.dumps({"params": n, "tokens": d, "final_eval_loss": l, "flops": c,
                          "data_entropy_nats": TRUE["E"]}) + "\n")
  out = tmp_path / "fit"
  assert scaling_cli.main(["fit", str(path), "--out", str(out), "--bootstrap", "5",
                       "--predict", "1e22"]) == 0
  result = json.loads((out / "fit.json").read_text())
  assert result["points"] == len(L)
  assert result["compute_optimal"][0]["C"] == 1e22
  assert result["parametric"]["alpha"] == pytest.approx(TRUE["alpha"], abs=0.05)
  for name in ("loss_vs_compute.png", "isoflop.png", "predicted_vs_observed.png"):
    assert os.path.getsize(out / name) > 10_000
  # Records that declare their data's entropy get E compared with it.
  assert result["entropy"]["H"] == TRUE["E"]
  assert result["entropy"]["E_minus_H"] == pytest.approx(result["parametric"]["E"] - TRUE["E"])
  assert abs(result["entropy"]["relative_gap"]) < 0.05
  out_text = capsys.readouterr().out
  assert "tokens/param" in out_text and "the data's entropy H" in out_text


def test_a_nearly_flat_term_means_e_is_not_identified():
  N, D = np.array([5e4, 1e6]), np.array([1e5, 1e7])  # 20x and 100x spreads
  flat = dict(E=0.0, A=1.9, alpha=0.008, B=1e6, beta=1.2)
  ident = scaling.identifiability(flat, N, D)
  assert ident["N_term_change"] == pytest.approx(1 - 20 ** -0.008)
  assert not ident["E_identified"]
  assert ident["floor_at_largest_N"] == pytest.approx(1.9 * 1e6 ** -0.008)
  assert scaling.identifiability(dict(flat, E=1.7, alpha=0.3), N, D)["E_identified"]


def test_known_entropy_needs_every_row_to_agree():
  assert scaling.known_entropy([{"data_entropy_nats": 1.5}] * 3) == 1.5
  assert scaling.known_entropy([{"data_entropy_nats": 1.5}, {}]) is None
  assert scaling.known_entropy([{"data_entropy_nats": 1.5}, {"data_entropy_nats": 1.6}]) is None


def test_cli_names_a_missing_column(tmp_path, capsys):
  path = tmp_path / "records.csv"
  path.write_text("N,D,loss\n1e7,1e9,3.0\n")
  assert scaling_cli.main(["fit", str(path), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err.strip()
  assert "'params'" in err and len(err.splitlines()) == 1
  assert not (tmp_path / "o").exists()


def test_notebook_runs_headless_on_a_generated_table(tmp_path, monkeypatch):
  """Executes every code cell of the shipped notebook, in order, in one namespace."""
  N, D, L, C = draw(noise=0.003)
  path = tmp_path / "records.jsonl"
  with open(path, "w") as f:
    for n, d, l, c in zip(N, D, L, C):
      f.write(json.dumps({"params": n, "tokens": d, "final_eval_loss": l, "flops": c}) + "\n")
  monkeypatch.setenv("FMJAX_RECORDS", str(path))
  monkeypatch.setenv("FMJAX_FIT_DIR", str(tmp_path / "fit"))
  monkeypatch.setenv("FMJAX_BOOTSTRAP", "3")
  notebook = os.path.join(os.path.dirname(__file__), "..", "experiments", "notebooks",
                          "scaling_laws.ipynb")
  with open(notebook) as f:
    cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  namespace = {}
  for i, cell in enumerate(cells):
    exec(compile("".join(cell["source"]), f"scaling_laws.ipynb cell {i}", "exec"), namespace)
  assert namespace["result"]["parametric"]["alpha"] == pytest.approx(TRUE["alpha"], abs=0.05)
  assert len(namespace["optimal"]["N"]) == 5
  assert (tmp_path / "fit" / "isoflop.png").exists()
