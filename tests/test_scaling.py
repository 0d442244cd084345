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


def write_csv(path, header, rows):
  with open(path, "w") as f:
    f.write(",".join(header) + "\n")
    for row in rows:
      f.write(",".join(str(x) for x in row) + "\n")


def test_cli_fits_a_plain_table_as_is_and_writes_plots(tmp_path, capsys):
  """A published-style CSV: its columns are found by name, no flags needed."""
  N, D, L, C = draw(noise=0.003)
  path = tmp_path / "published.csv"
  write_csv(path, ["Model Size", "Training Tokens", "loss", "Training FLOP", "data_entropy_nats"],
            zip(N, D, L, C, [TRUE["E"]] * len(L)))
  out = tmp_path / "fit"
  assert scaling_cli.main(["fit", str(path), "--out", str(out), "--bootstrap", "5",
                       "--predict", "1e22"]) == 0
  result = json.loads((out / "fit.json").read_text())
  assert result["columns"] == dict(N="Model Size", D="Training Tokens", loss="loss",
                                   C="Training FLOP")
  assert result["points"] == len(L)
  assert result["compute_optimal"][0]["C"] == 1e22
  assert result["parametric"]["alpha"] == pytest.approx(TRUE["alpha"], abs=0.05)
  for name in ("loss_vs_compute.png", "isoflop.png", "predicted_vs_observed.png"):
    assert os.path.getsize(out / name) > 10_000
  # Records that declare their data's entropy get E compared with it.
  assert result["entropy"]["H"] == TRUE["E"]
  assert result["entropy"]["E_minus_H"] == pytest.approx(result["parametric"]["E"] - TRUE["E"])
  assert abs(result["entropy"]["relative_gap"]) < 0.05
  captured = capsys.readouterr()
  assert captured.out.startswith("24 runs (N=Model Size, D=Training Tokens, loss=loss, "
                                 "C=Training FLOP)\n")
  assert "tokens/param" in captured.out and "the data's entropy H" in captured.out
  assert "bootstrap resamples" in captured.err  # progress, on stderr


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


def test_columns_are_found_by_their_common_names():
  fmjax_row = {"params": 1e7, "non_embedding_params": 8e6, "active_params": 1e7, "tokens": 1e9,
               "flops": 6e16, "flops_6nd": 6e16, "final_eval_loss": 3.0, "best_eval_loss": 2.9}
  assert scaling.find_columns([fmjax_row]) == dict(N="params", D="tokens",
                                                   loss="final_eval_loss", C="flops")
  published = {"Model Size": 1e7, "Training Tokens": 1e9, "loss": 3.0}
  assert scaling.find_columns([published]) == dict(N="Model Size", D="Training Tokens",
                                                   loss="loss", C=None)
  assert scaling.find_columns([{"N": 1, "D": 2, "L": 3, "C": 4}]) == dict(N="N", D="D",
                                                                          loss="L", C="C")
  named = scaling.find_columns([fmjax_row], n="active_params", loss="best_eval_loss", c="")
  assert named == dict(N="active_params", D="tokens", loss="best_eval_loss", C=None)
  with pytest.raises(scaling.ColumnError, match=r"^the table has no loss column: none of "
                                                r"final_eval_loss, .*; its columns are N, D, "
                                                r"accuracy$") as e:
    scaling.find_columns([{"N": 1, "D": 2, "accuracy": 0.5}])
  assert (e.value.role, e.value.given) == ("loss", None)
  with pytest.raises(scaling.ColumnError, match=r"no column 'size' \(named for model-size"):
    scaling.find_columns([published], n="size")
  N, D, L, C = scaling.columns([{"N": 2.0, "D": 3.0, "loss": 1.5}])
  assert C == pytest.approx([36.0])  # 6 N D
  with pytest.raises(ValueError, match=r"^row 1 of the table has no 'loss' value"):
    scaling.columns([{"N": 2.0, "D": 3.0, "loss": 1.5}, {"N": 2.0, "D": 3.0}])
  with pytest.raises(ValueError, match=r"^row 0 of the table: N='big' is not a number"):
    scaling.columns([{"N": "big", "D": 3.0, "loss": 1.5}])


def test_cli_names_what_the_table_lacks(tmp_path, capsys):
  path = tmp_path / "records.csv"
  write_csv(path, ["N", "D", "accuracy"], [(1e7, 1e9, 0.5)])
  assert scaling_cli.main(["fit", str(path), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith(f"fmjax: {path} has no loss column: ")
  assert err.endswith("its columns are N, D, accuracy; name it with --loss_column=COLUMN")
  assert scaling_cli.main(["fit", str(path), "--out", str(tmp_path / "o"),
                           "--loss_column=acc"]) == 2
  assert capsys.readouterr().err.startswith(f"fmjax: --loss_column=acc: {path} has no column "
                                            "'acc' (named for loss)")
  assert not (tmp_path / "o").exists()


def test_bootstrap_shows_progress(capsys):
  N, D, L, _ = draw(noise=0.003)
  few = {k: (v,) for k, v in dict(a=5.0, b=5.0, e=0.5, alpha=0.3, beta=0.3).items()}
  scaling.fit_parametric(N, D, L, grid=few, refine=1, bootstrap=2, progress=True)
  err = capsys.readouterr().err
  assert "bootstrap resamples" in err and "/2 [" in err  # the bar and its total (updates are timed)
  scaling.fit_parametric(N, D, L, grid=few, refine=1, bootstrap=2)
  assert capsys.readouterr().err == ""


def run_notebook(records, tmp_path, monkeypatch, cells=None):
  """Executes the code cells of the shipped notebook (the first `cells`, or all), in
  order, in one namespace."""
  monkeypatch.setenv("FMJAX_RECORDS", str(records))
  monkeypatch.setenv("FMJAX_FIT_DIR", str(tmp_path / "fit"))
  monkeypatch.setenv("FMJAX_BOOTSTRAP", "3")
  notebook = os.path.join(os.path.dirname(__file__), "..", "experiments", "notebooks",
                          "scaling_laws.ipynb")
  with open(notebook) as f:
    code = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  namespace = {}
  for i, cell in enumerate(code[:cells]):
    exec(compile("".join(cell["source"]), f"scaling_laws.ipynb cell {i}", "exec"), namespace)
  return namespace


def test_notebook_runs_headless_on_a_generated_table(tmp_path, monkeypatch):
  N, D, L, C = draw(noise=0.003)
  path = tmp_path / "records.jsonl"
  with open(path, "w") as f:
    for n, d, l, c in zip(N, D, L, C):
      f.write(json.dumps({"params": n, "tokens": d, "final_eval_loss": l, "flops": c}) + "\n")
  namespace = run_notebook(path, tmp_path, monkeypatch)
  assert namespace["result"]["parametric"]["alpha"] == pytest.approx(TRUE["alpha"], abs=0.05)
  assert namespace["result"]["columns"] == dict(N="params", D="tokens", loss="final_eval_loss",
                                                C="flops")
  assert len(namespace["optimal"]["N"]) == 5
  assert (tmp_path / "fit" / "isoflop.png").exists()


def test_notebook_reads_a_plain_table_and_names_what_one_lacks(tmp_path, monkeypatch):
  """The notebook's loading cell reads what the command reads; the fit cells after it
  take the points whatever their columns were called."""
  N, D, L, _ = draw(noise=0.003)
  path = tmp_path / "plain.csv"
  write_csv(path, ["N", "D", "loss"], zip(N, D, L))
  namespace = run_notebook(path, tmp_path, monkeypatch, cells=1)
  assert namespace["table"].columns == dict(N="N", D="D", loss="loss", C=None)
  np.testing.assert_array_equal(namespace["L"], L)
  np.testing.assert_allclose(namespace["C"], 6 * N * D)
  write_csv(path, ["N", "tokens_seen", "loss"], zip(N, D, L))
  with pytest.raises(scaling.ColumnError) as e:
    run_notebook(path, tmp_path, monkeypatch, cells=1)
  assert str(e.value).startswith(f"{path} has no training-tokens (D) column: none of tokens, D")
  assert "its columns are N, tokens_seen, loss" in str(e.value) and "--" not in str(e.value)
