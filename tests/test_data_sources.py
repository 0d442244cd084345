"""Sources, mixtures, curricula, the synthetic corpus, and exact resume with any worker count."""

import json
import os

import numpy as np
import pytest

from conftest import assert_batches_equal, data_cfg, take, tiny_config
from fmjax.validate import validate
from fmjax import config as config_lib
from fmjax.data import mixture, pipeline, sources, synthetic, tokenizer as tokenizer_lib

VOCAB = 512
# Two synthetic sources told apart by their ids: A's are < 4 + 8, B's rows reach higher.
A, B = "a=synthetic(states=8, doc_len=40)", "b=synthetic(states=64, seed=1, doc_len=40)"


def source_of_rows(batch):
  """'a' or 'b' for every row of a batch of the A/B mixture."""
  return np.where(batch["tokens"].max(axis=1) < synthetic.FIRST_ID + 8, "a", "b")


# The synthetic corpus.


def test_synthetic_chain_is_a_proper_markov_chain():
  chain = synthetic.Chain(states=32, branching=4)
  p = chain.matrix()
  np.testing.assert_allclose(p.sum(axis=1), 1.0)
  assert ((p > 0).sum(axis=1) == 4).all()
  pi = chain.stationary()
  assert (pi > 0).all()
  np.testing.assert_allclose(pi @ p, pi, atol=1e-12)
  # The entropy rate is at most log(branching), and is the pi-weighted row entropy.
  rows = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(axis=1)
  assert chain.entropy_rate() == pytest.approx(pi @ rows, rel=1e-12)
  assert 0 < chain.entropy_rate() < np.log(4)


def test_synthetic_empirical_entropy_matches_the_exact_value():
  chain = synthetic.Chain()  # the defaults: 256 states, 8 successors each
  docs = synthetic.Documents(chain, "train")
  ids = np.stack([docs[i]["tokens"] for i in range(200)]) - synthetic.FIRST_ID  # 200 x 512
  p = chain.matrix()
  # -log P(next | previous) under the true model: a mean of ~100k terms.
  nll = -np.log(p[ids[:, :-1], ids[:, 1:]])
  exact = chain.entropy_rate()
  stderr = nll.std() / np.sqrt(nll.size)
  assert abs(nll.mean() - exact) < 4 * stderr, (nll.mean(), exact, stderr)
  # The plug-in estimate from transition counts agrees as well (its bias is ~1e-3 here).
  counts = np.zeros_like(p)
  np.add.at(counts, (ids[:, :-1].ravel(), ids[:, 1:].ravel()), 1)
  p_hat = counts / counts.sum(axis=1, keepdims=True)
  pi_hat = counts.sum(axis=1) / counts.sum()
  plug_in = -(pi_hat * np.where(p_hat > 0, p_hat * np.log(np.where(p_hat > 0, p_hat, 1)),
                                0).sum(axis=1)).sum()
  assert plug_in == pytest.approx(exact, abs=0.02)
  # Documents start from the stationary distribution.
  np.testing.assert_allclose(np.bincount(ids.ravel(), minlength=256) / ids.size,
                             chain.stationary(), atol=0.01)


def test_synthetic_documents_are_deterministic_and_splits_differ():
  chain = synthetic.parse("states=16, branching=3, doc_len=20")
  assert (chain.states, chain.branching, chain.doc_len) == (16, 3, 20)
  train, again = synthetic.Documents(chain, "train"), synthetic.Documents(chain, "train")
  np.testing.assert_array_equal(train[5]["tokens"], again[5]["tokens"])
  validation = synthetic.Documents(chain, "validation")
  assert not np.array_equal(train[0]["tokens"], validation[0]["tokens"])
  tokens = np.concatenate([train[i]["tokens"] for i in range(20)])
  assert tokens.min() >= synthetic.FIRST_ID and tokens.max() < chain.vocab_size == 20
  with pytest.raises(ValueError, match="expected key=integer"):
    synthetic.parse("states=16, colour=3")


def test_synthetic_batches_bypass_the_tokenizer_and_report_entropy(data_dir, tok):
  spec = "synthetic(states=16, doc_len=20, train_docs=50)"
  d = data_cfg(data_dir, mixture=spec)
  batch = next(iter(pipeline.train_dataset(d, tok, batch_size=4)))
  docs = synthetic.Documents(synthetic.parse(spec[10:-1]), "train")
  row = batch["tokens"][0]
  # The row is a run of documents' ids, straight from the source: no bos/eos.
  assert tok.bos_id not in row and tok.eos_id not in row
  assert any(np.array_equal(row[:20], docs[i]["tokens"]) for i in range(len(docs)))
  meta = pipeline.data_metadata(d)
  assert meta["data_entropy_nats"] == synthetic.parse("states=16").entropy_rate()
  assert "data_entropy_nats" not in pipeline.data_metadata(data_cfg(data_dir))
  with pytest.raises(ValueError, match="token ids up to 603.*vocab_size >= 604"):
    pipeline.check_vocab(tok, VOCAB, data_cfg(data_dir, mixture="kjv:1, synthetic(states=600):1"))


# Mixtures and curricula.


def test_parse_mixture_and_curriculum():
  c = mixture.parse_mixture("kjv:3, web=arrayrecord(/d/w-{split}.ar-*):1, synthetic(states=9)")
  assert [(x.name, x.spec, x.weight) for x in c] == [
      ("kjv", "kjv", 3.0), ("web", "arrayrecord(/d/w-{split}.ar-*)", 1.0),
      ("synthetic(states=9)", "synthetic(states=9)", 1.0)]
  stages = mixture.parse_curriculum("10: kjv:1, web:1; 20: web:1", c)
  assert stages == [(0, {"kjv": 0.6, "web": 0.2, "synthetic(states=9)": 0.2}),
                    (10, {"kjv": 0.5, "web": 0.5}), (20, {"web": 1.0})]
  t = sources.parse("tfds(wiki/20230601.en:1.0.0, data_dir=/x, validation=test)")
  assert (t.kind, t.args, t.get("validation"), t.get("data_dir")) == (
      "tfds", ("wiki/20230601.en:1.0.0",), "test", "/x")


@pytest.mark.parametrize("field,value,message", [
    ("mixture", "kjv:0.5, kjv:0.5", "source 'kjv' appears twice"),
    ("mixture", "kjv:-1", "weights must be > 0"),
    ("mixture", "kjv:lots", "the weight after the last ':' must be a number"),
    ("mixture", "arrayrecord(/data/x.array_record)", "the glob must contain {split}"),
    ("mixture", "synthetic(states=2)", "states=2 must be >= 3"),
    ("mixture", "tfds()", "takes 1 positional argument"),
    ("curriculum", "5: c4:1", "name:weight with a name from data.mixture (kjv)"),
    ("curriculum", "5: kjv:1; 5: kjv:2", "curriculum steps must increase"),
    ("curriculum", "5: kjv:0", "gives every source weight 0"),
    ("bad_utf8", "ignore", "data.bad_utf8='ignore' is not one of error, skip"),
    ("max_skip_fraction", 2.0, "data.max_skip_fraction=2.0 must be in [0, 1]"),
])
def test_bad_data_fields_are_config_errors(field, value, message):
  cfg = tiny_config()
  cfg.data[field] = value
  with pytest.raises(config_lib.ConfigError) as e:
    validate(cfg, n_devices=8)
  assert message in str(e.value) and f"data.{field}=" in str(e.value)
  assert "\n" not in str(e.value)


def test_mixture_respects_weights(data_dir, tok):
  d = data_cfg(data_dir, mixture=f"{A}:0.7, {B}:0.3")
  rows = np.concatenate([source_of_rows(b) for b in
                         take(iter(pipeline.train_dataset(d, tok, batch_size=10)), 40)])
  n, share = len(rows), (rows == "a").mean()
  assert abs(share - 0.7) < 3 * np.sqrt(0.7 * 0.3 / n)  # within sampling error (400 rows)
  # Each source's rows are its own stream, as if it were trained on alone.
  alone = take(iter(pipeline.train_dataset(data_cfg(data_dir, mixture=A), tok, batch_size=1)),
               int((rows == "a").sum()))
  mixed_a = np.concatenate([b["tokens"][source_of_rows(b) == "a"] for b in
                            take(iter(pipeline.train_dataset(d, tok, batch_size=10)), 40)])
  np.testing.assert_array_equal(mixed_a, np.concatenate([b["tokens"] for b in alone]))


def test_curriculum_changes_weights_at_its_steps_and_resumes(data_dir, tok):
  d = data_cfg(data_dir, mixture=f"{A}:1, {B}:1", curriculum="4: a:1; 8: a:1, b:3")
  batches = take(iter(pipeline.train_dataset(d, tok, batch_size=8)), 12)
  shares = [(source_of_rows(b) == "a").mean() for b in batches]
  assert np.mean(shares[:4]) == 0.5 and shares[4:8] == [1.0] * 4
  assert np.mean(shares[8:]) == 0.25
  # b, left out for 4 steps, carries on where it stopped: its rows are those it has
  # without a curriculum.
  def b_rows(batches):
    return np.concatenate([b["tokens"][source_of_rows(b) == "b"] for b in batches])
  constant = take(iter(pipeline.train_dataset(data_cfg(data_dir, mixture=d.mixture), tok,
                                              batch_size=8)), 12)
  np.testing.assert_array_equal(b_rows(batches), b_rows(constant)[:len(b_rows(batches))])
  # Exact resume from states before, at and inside the stage without b.
  for k in (2, 4, 6, 9):
    it = iter(pipeline.train_dataset(d, tok, batch_size=8))
    take(it, k)
    state = json.dumps(it.get_state())
    resumed = iter(pipeline.train_dataset(d, tok, batch_size=8))
    pipeline.restore_iterator_state(resumed, state)
    assert_batches_equal(take(resumed, 12 - k), batches[k:])


def test_sources_from_tfds_and_arrayrecord(data_dir, tok, tmp_path):
  kjv_docs = pipeline.open_sources(data_cfg(data_dir), "validation")["kjv"].records
  texts = [r["text"] for r in kjv_docs.__getitems__(range(len(kjv_docs)))]
  from array_record.python.array_record_module import ArrayRecordWriter
  for split, (lo, hi) in {"train": (0, 30), "validation": (30, 59)}.items():
    for shard in range(2):  # two files per split
      w = ArrayRecordWriter(str(tmp_path / f"k-{split}.array_record-{shard:05d}"), "group_size:1")
      for t in texts[lo:hi][shard::2]:
        w.write(t)
      w.close()
  glob = str(tmp_path / "k-{split}.array_record-*")
  src = sources.open_source(f"arrayrecord({glob})", "validation", data_dir)
  assert len(src.records) == 29 and src.records[0]["text"] == texts[30]
  assert src.where(15) == f"{tmp_path}/k-validation.array_record-00001 record 0"
  tf = sources.open_source(f"tfds(kjv, data_dir={data_dir}, train=validation)", "train", "")
  assert [tf.records[i]["text"] for i in range(59)] == texts
  d = data_cfg(data_dir, mixture=f"k=arrayrecord({glob}):1, kjv:1", seq_len=64)
  batch = next(iter(pipeline.train_dataset(d, tok, batch_size=4)))
  assert batch["tokens"].shape == (4, 64)
  evals = pipeline.eval_batches(d, tok, batch_size=4, num_batches=2)
  assert len(evals) == 2


def test_resume_into_another_number_of_workers(data_dir, tok):
  d0 = data_cfg(data_dir, seq_len=64)
  d2 = data_cfg(data_dir, seq_len=64, num_workers=2)
  straight = take(iter(pipeline.train_dataset(d0, tok, batch_size=4)), 8)
  it = iter(pipeline.train_dataset(d2, tok, batch_size=4))
  assert_batches_equal(take(it, 3), straight[:3])  # workers give the same batches
  state = pipeline.iterator_state_to_json(it)
  it.close()
  resumed = iter(pipeline.train_dataset(d0, tok, batch_size=4))  # 2 workers -> none
  pipeline.restore_iterator_state(resumed, state)
  assert_batches_equal(take(resumed, 2), straight[3:5])
  state = pipeline.iterator_state_to_json(resumed)
  again = iter(pipeline.train_dataset(d2, tok, batch_size=4))  # none -> 2 workers
  pipeline.restore_iterator_state(again, state)
  assert_batches_equal(take(again, 3), straight[5:8])
  again.close()


def test_train_tokenizer_tool(data_dir, tmp_path, capsys):
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                      "train_tokenizer.py")
  spec = importlib.util.spec_from_file_location("train_tokenizer", path)
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  from fmjax.data import kjv
  kjv.load_source(data_dir, "validation")  # built, for the tfds(...) source
  out = str(tmp_path / "small.model")
  mixture_arg = f"tfds(kjv, data_dir={data_dir}, train=validation)"  # 59 chapters
  assert tool.main([f"--mixture={mixture_arg}", f"--data_dir={data_dir}", "--vocab_size=400",
                    "--model_type=unigram", f"--out={out}"]) == 0
  assert "exact round trip on 50 validation documents" in capsys.readouterr().out
  tok = tokenizer_lib.from_config(data_cfg(data_dir, tokenizer_path=out), 512)
  assert tok.vocab_size == 400 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  text = "  Ünïcödé\tand\n\nspaces  "
  assert tok.decode(tok.encode(text)) == text
  with pytest.raises(ValueError, match="has 400 pieces but the model's vocab_size is 384"):
    pipeline.check_vocab(tok, 384)
  assert tool.main(["--mixture=synthetic", "--vocab_size=400", f"--out={out}"]) == 2
  assert "holds token ids already" in capsys.readouterr().err
