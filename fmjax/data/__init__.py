"""The data pipeline: the embedded corpus, its tokenizer, and packed batches.

- `kjv`: the King James Bible as a TFDS dataset (one document per chapter).
- `tokenizer`: a sentencepiece model trained once on the corpus, with an exact round trip.
- `pipeline`: grain pipelines that shuffle, tokenize and pack documents into rows.
"""
