"""Downstream scores against loss and compute: the sigmoid fit, its intervals, the command."""

import json
import os

import numpy as np
import pytest

from fmjax.scaling import cli, downstream

E, A, GAMMA = 1.5, 30.0, 0.15
TRUE = downstream.SigmoidFit(floor=0.25, ceiling=0.95, k=20.0, L0=1.72)


def sweep_rows(noise=0.01, seed=1):
  """Records of nine runs on a known loss-compute law, each with a suite score on a known
  sigmoid of its loss, as a sweep with train.eval_suite writes them."""
  rng = np.random.default_rng(seed)
  rows = []
  for i, c in enumerate(np.geomspace(1e13, 1e16, 9)):
    loss = E + A / c ** GAMMA
    n = 1e6 * 2 ** i
    rows.append(dict(name=f"r{i}", params=n, tokens=c / (6 * n), flops=c, final_eval_loss=loss,
                     suite={"cloze": dict(kind="multiple_choice", metrics=dict(
                         acc=float(TRUE(loss) + rng.normal(0, noise)), ece=0.1))}))
  return rows


def test_sigmoid_of_loss_is_recovered_and_the_prediction_interval_covers_the_truth():
  C, L, y = downstream.points(sweep_rows(), "cloze/acc")
  result = downstream.fit_downstream(C, L, y, floor=0.25, predict_at=[1e17], bootstrap=30)
  s = result["sigmoid"]
  assert s["floor"] == 0.25 and "floor" not in s["intervals"]
  assert s["k"] == pytest.approx(TRUE.k, rel=0.15) and s["L0"] == pytest.approx(TRUE.L0, abs=0.02)
  lo, hi = s["intervals"]["L0"]
  assert lo <= TRUE.L0 <= hi
  p = result["predictions"][0]
  true_loss = E + A / 1e17 ** GAMMA
  assert p["loss"] == pytest.approx(true_loss, rel=1e-4)
  assert p["score_interval"][0] <= float(TRUE(true_loss)) <= p["score_interval"][1]
  assert p["score"] > max(y)  # beyond every run: the point of the fit


def test_noise_free_scores_are_fitted_exactly_with_every_parameter_free():
  L = np.linspace(1.6, 1.9, 12)
  fit = downstream.fit_sigmoid(L, TRUE(L))
  for name in downstream.NAMES:
    assert getattr(fit, name) == pytest.approx(getattr(TRUE, name), rel=1e-4)
  # A score that rises with loss (bits per byte) is fitted too: its "floor" lies above.
  rising = downstream.fit_sigmoid(L, 1.0 - TRUE(L))
  assert rising.rmse < 1e-6
  np.testing.assert_allclose(rising(L), 1.0 - TRUE(L), atol=1e-6)


def test_rows_without_the_metric_are_named_with_what_they_have():
  rows = sweep_rows()
  with pytest.raises(ValueError, match=r"row 1 \(r0\) has no 'cloze/accuracy'; its suite has "
                                       r"cloze/acc, cloze/ece"):
    downstream.scores(rows, "cloze/accuracy")
  with pytest.raises(ValueError, match="run the sweep with train.eval_suite"):
    downstream.scores([dict(name="x", final_eval_loss=2.0)], "cloze/acc")
  assert list(downstream.scores([dict(score=0.5)], "score")) == [0.5]  # a plain column
  with pytest.raises(ValueError, match="fix the floor"):
    downstream.fit_sigmoid([1.0, 2.0, 3.0], [0.1, 0.5, 0.9])


def test_the_command_writes_the_fit_and_the_picture(tmp_path, capsys):
  records = tmp_path / "records.jsonl"
  records.write_text("".join(json.dumps(r) + "\n" for r in sweep_rows()))
  out = tmp_path / "out"
  argv = ["downstream", str(records), "--metric=cloze/acc", f"--out={out}", "--floor=0.25",
          "--predict", "1e17", "--bootstrap=12"]
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out
  assert "C=1e+17: loss 1.5846" in printed and "cloze/acc" in printed
  saved = json.loads((out / "downstream.json").read_text())
  assert saved["metric"] == "cloze/acc" and len(saved["predictions"]) == 1
  assert os.path.getsize(out / "downstream.png") > 10_000
  assert cli.main(["downstream", str(records), "--metric=cloze/nope", f"--out={tmp_path}/x"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("fmjax: ") and "has no 'cloze/nope'" in err[0]
  assert not os.path.exists(tmp_path / "x")
