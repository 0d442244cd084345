"""Bad data: each kind gets a counted, logged skip or an error naming its file and record."""

import json
import os

import numpy as np
import pytest

from fmjax.data import ingest as convert, pipeline, tokenizer as tokenizer_lib
from conftest import data_cfg

VOCAB = 512


def write_records(path, records):
  from array_record.python.array_record_module import ArrayRecordWriter
  w = ArrayRecordWriter(str(path), "group_size:1")
  for r in records:
    w.write(r)
  w.close()


GOOD = [f"Document number {i} says something.".encode() for i in range(200)]


def corpus(tmp_path, train, name="c"):
  write_records(tmp_path / f"{name}-train.array_record-00000", train)
  write_records(tmp_path / f"{name}-validation.array_record-00000", GOOD[:5])
  return f"arrayrecord({tmp_path}/{name}-{{split}}.array_record-*)"


def find(state, key):
  """The first dict in a nested iterator state that has `key`."""
  if isinstance(state, dict):
    if key in state:
      return state
    state = list(state.values())
  if isinstance(state, list):
    return next((f for f in (find(s, key) for s in state) if f is not None), None)
  return None


def docs_of(batches, tok):
  tokens = np.concatenate([b["tokens"].reshape(-1) for b in batches])
  starts = np.flatnonzero(tokens == tok.bos_id)
  return [tok.decode(tokens[s + 1:e - 1]) for s, e in zip(starts, starts[1:])]


def test_empty_and_overlong_documents_are_skipped_counted_and_logged(data_dir, tok, tmp_path,
                                                                    caplog):
  train = GOOD[:3] + [b"", b"   \n\t "] + GOOD[3:6] + [b"x" * 5000] + GOOD[6:100]
  d = data_cfg(data_dir, mixture=corpus(tmp_path, train), max_doc_bytes=4096, seed=3,
               max_skip_fraction=0.05)
  it = iter(pipeline.train_dataset(d, tok, batch_size=4))
  batches = [next(it) for _ in range(20)]  # about two epochs
  seen = docs_of(batches, tok)
  assert sorted(set(seen)) == sorted(t.decode() for t in GOOD[:100])  # nothing else trained on
  state = it.get_state()
  skip_state = find(state, "skipped")  # counted, and checkpointed
  messages = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
  assert skip_state["seen"] > 107 and skip_state["skipped"] == len(messages) >= 3
  assert any(f"c-train.array_record-00000 record 3: empty document" in m for m in messages)
  assert any("record 4: empty document" in m for m in messages)
  assert any("record 8: 5000 bytes, over data.max_doc_bytes=4096" in m for m in messages)


def test_text_that_is_not_utf8_is_an_error_naming_file_and_record(data_dir, tok, tmp_path):
  train = GOOD[:7] + [b"caf\xe9 au lait"] + GOOD[7:50]
  d = data_cfg(data_dir, mixture=corpus(tmp_path, train))
  with pytest.raises(pipeline.BadDataError) as e:
    it = iter(pipeline.train_dataset(d, tok, batch_size=4))
    for _ in range(40):
      next(it)
  message = str(e.value)
  assert f"{tmp_path}/c-train.array_record-00000 record 7: not UTF-8" in message
  assert "data.bad_utf8='skip'" in message
  # With bad_utf8="skip" it is skipped like an empty document.
  d.bad_utf8 = "skip"
  d.max_skip_fraction = 0.05
  seen = docs_of([b for b, _ in zip(iter(pipeline.train_dataset(d, tok, batch_size=4)),
                                    range(40))], tok)
  assert "caf" not in "".join(seen) and len(set(seen)) == 50


def test_a_source_of_mostly_garbage_stops_the_run(data_dir, tok, tmp_path):
  train = [b"" if i % 10 == 0 else g for i, g in enumerate(GOOD)]  # 10% empty
  d = data_cfg(data_dir, mixture=corpus(tmp_path, train))
  with pytest.raises(pipeline.BadDataError, match=r"documents read so far were skipped, over "
                     r"data.max_skip_fraction=0.01 \(last: .*record \d+: empty document\)"):
    it = iter(pipeline.train_dataset(d, tok, batch_size=4))
    for _ in range(100):
      next(it)


def test_missing_files_are_clear_errors(data_dir, tok, tmp_path):
  glob = f"{tmp_path}/nothing-{{split}}.array_record-*"
  with pytest.raises(FileNotFoundError, match=f"no files match {tmp_path}/nothing-train"):
    pipeline.train_dataset(data_cfg(data_dir, mixture=f"arrayrecord({glob})"), tok, batch_size=4)
  with pytest.raises(FileNotFoundError, match="cannot read split 'train' of a prepared TFDS "
                                              "dataset 'my_corpus'"):
    pipeline.train_dataset(data_cfg(data_dir, mixture=f"tfds(my_corpus, data_dir={tmp_path})"),
                           tok, batch_size=4)
  with pytest.raises(FileNotFoundError, match="data.tokenizer_path='/no/such.model': no such "
                                              "file; train one with tools/train_tokenizer.py"):
    tokenizer_lib.from_config(data_cfg(data_dir, tokenizer_path="/no/such.model"), VOCAB)
  with pytest.raises(FileNotFoundError, match="input /no/such/\\*.txt: no such file"):
    convert.convert(["/no/such/*.txt"], str(tmp_path / "out"), progress=False)


def test_convert_text_and_jsonl(data_dir, tok, tmp_path):
  (tmp_path / "a.txt").write_text("First paragraph,\ntwo lines.\n\n\n\nSecond one.\n")
  (tmp_path / "b.jsonl").write_text(
      json.dumps({"text": "From JSON: ünïcödé"}) + "\n\n" + json.dumps({"text": ""}) + "\n" +
      json.dumps({"text": "y" * 100}) + "\n")
  out = str(tmp_path / "conv" / "mine")
  summary = convert.convert([str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl")], out,
                            unit="paragraph", validation_every=3, max_doc_bytes=50,
                            progress=False)
  assert summary["documents"] == {"train": 2, "validation": 1}
  assert summary["skipped"] == {"empty": 1, "over 50 bytes": 1}
  spec = summary["source"]
  assert spec == f"arrayrecord({out}-{{split}}.array_record-*)"
  from fmjax.data import sources
  train = sources.open_source(spec, "train", data_dir).records
  validation = sources.open_source(spec, "validation", data_dir).records
  assert [train[i]["text"].decode() for i in range(2)] == ["First paragraph,\ntwo lines.",
                                                          "Second one."]
  assert validation[0]["text"].decode() == "From JSON: ünïcödé"
  with open(out + ".json") as f:
    assert json.load(f)["documents"]["train"] == 2


def test_convert_names_bad_lines(tmp_path):
  (tmp_path / "bad.txt").write_bytes(b"fine\n\nnot \xff fine\n")
  with pytest.raises(convert.ConversionError, match=r"bad.txt line 3: not UTF-8"):
    convert.convert([str(tmp_path / "bad.txt")], str(tmp_path / "o"), unit="paragraph",
                    progress=False)
  assert not os.listdir(tmp_path / ".") == []  # the input is still there
  assert not [p for p in os.listdir(tmp_path) if p.startswith(("o-", ".tmp_"))]  # no output
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
  with pytest.raises(convert.ConversionError, match=r"bad.jsonl line 2: not a JSON object with "
                                                    r"a string field 'text'"):
    convert.convert([str(tmp_path / "bad.jsonl")], str(tmp_path / "o"), progress=False)
  summary = convert.convert([str(tmp_path / "bad.*")], str(tmp_path / "o"), unit="paragraph",
                            bad="skip", progress=False)
  assert summary["skipped"] == {"not UTF-8": 1, "bad JSON": 1}
  assert summary["documents"] == {"train": 2}
