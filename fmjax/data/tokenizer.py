"""A sentencepiece tokenizer trained once on the corpus, with an exact round trip.

`load_or_train(data_dir, vocab_size, model_type)` trains a model on the train
split of `kjv` the first time and caches it as
`{data_dir}/kjv_{model_type}_{vocab_size}.model`; later calls load that file.
`tools/train_tokenizer.py` trains one on any source (`train_on`), for
`data.tokenizer_path`.

decode(encode(s)) == s for any string: no normalization, whitespace kept as
is (including runs of spaces and whitespace-only pieces), "\\n" and "\\t" are
pieces of their own, and characters outside the vocabulary fall back to bytes.
Special ids: pad=0, unk=1, bos=2, eos=3.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Iterable

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Pieces in every model: 4 special, "\n", "\t", 256 bytes, the corpus's 64 other characters.
MIN_VOCAB_SIZE = 4 + 2 + 256 + 64


class Tokenizer:
  """A sentencepiece model file, loaded. Pickles as its path (for grain workers)."""

  def __init__(self, path: str):
    self.path = path
    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size, self.pad_id = self._sp.vocab_size(), self._sp.pad_id()
    self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
    if self.pad_id != 0:
      raise ValueError(f"{path}: pad id is {self.pad_id}, expected 0")

  def __reduce__(self):
    return Tokenizer, (self.path,)

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])


def model_path(data_dir: str, vocab_size: int, model_type: str = "bpe") -> str:
  return os.path.join(data_dir, f"kjv_{model_type}_{vocab_size}.model")


def load_or_train(data_dir: str, vocab_size: int, model_type: str = "bpe") -> Tokenizer:
  """The cached tokenizer for (vocab_size, model_type), trained first if missing."""
  path = model_path(data_dir, vocab_size, model_type)
  if not os.path.exists(path):
    write_atomically(path, train(data_dir, vocab_size, model_type))
  return Tokenizer(path)


def from_config(d, vocab_size: int) -> Tokenizer:
  """The tokenizer a config's data section names: data.tokenizer_path, or kjv's own."""
  if d.get("tokenizer_path"):  # absent from configs saved before it existed
    path = os.path.expanduser(d.tokenizer_path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"data.tokenizer_path={d.tokenizer_path!r}: no such file; "
                              "train one with tools/train_tokenizer.py")
    return Tokenizer(path)
  return load_or_train(os.path.expanduser(d.data_dir), vocab_size, d.tokenizer)


def train(data_dir: str, vocab_size: int, model_type: str = "bpe") -> bytes:
  """The bytes of a model trained on kjv's train split, one verse per sentence.

  Deterministic: the same corpus and arguments give the same bytes.
  """
  if vocab_size < MIN_VOCAB_SIZE:
    raise ValueError(f"vocab_size={vocab_size} is too small for a tokenizer with byte "
                     f"fallback; use at least {MIN_VOCAB_SIZE}")
  from fmjax.data import kjv  # only when used: it loads tensorflow_datasets
  source = kjv.load_source(data_dir, "train")
  records = source.__getitems__(range(len(source)))
  verses = [line for r in records for line in r["text"].decode("utf-8").split("\n")]
  return train_on(verses, vocab_size, model_type)


def train_on(sentences: Iterable[str], vocab_size: int, model_type: str = "bpe",
             max_sentences: int = 0) -> bytes:
  """The bytes of a model with an exact round trip, trained on `sentences`.

  max_sentences > 0 trains on that many sentences drawn from the input (with
  sentencepiece's own seeded sampling); 0 uses them all.
  """
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_writer=model,
      model_type=model_type,
      vocab_size=vocab_size,
      input_sentence_size=max_sentences,
      character_coverage=1.0,
      byte_fallback=True,
      # Exact round trip: keep every character and every space as written.
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      user_defined_symbols=["\n", "\t"],
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      num_threads=1,  # deterministic
      minloglevel=2,  # quiet
  )
  return model.getvalue()


def write_atomically(path: str, data: bytes):
  """Writes via a temporary file and a rename, so readers never see half a file."""
  directory = os.path.dirname(path) or "."
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=".model")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
