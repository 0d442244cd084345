"""Scripture cloze: finish a held-out King James verse, as multiple choice.

Each item is a verse of a held-out (validation) chapter with at least
MIN_WORDS words: the context is the verse before it and the verse without its
last TAIL words; the choices are those words and the last TAIL words of three
other verses of the split, in an order drawn from the seed. A model that has
learnt the language of the corpus, not just its words, picks the true ending.
"""

from __future__ import annotations

import numpy as np

TAIL = 3
MIN_WORDS = 8
CHOICES = 4


def items(chapters: list[tuple[str, str]], examples: int, seed: int = 0) -> list[dict]:
  """Up to `examples` (0: all) items {"context", "choices", "answer"} from (name, text)
  chapters, one verse per line; a pure function of the chapters and the seed."""
  verses = [(c, v, line) for c, (_, text) in enumerate(chapters)
            for v, line in enumerate(text.split("\n"))]
  candidates = [k for k, (_, v, line) in enumerate(verses)
                if v > 0 and len(line.split()) >= MIN_WORDS]
  endings = sorted({" ".join(line.split()[-TAIL:]) for _, _, line in verses
                    if len(line.split()) >= TAIL + 1})
  if len(endings) < CHOICES:
    raise ValueError(f"{len(endings)} distinct verse endings; {CHOICES} choices need more")
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(candidates))
  out = []
  for k in (candidates[i] for i in order[:examples or len(order)]):
    _, _, line = verses[k]
    words = line.split()
    right = " ".join(words[-TAIL:])
    wrong = []
    while len(wrong) < CHOICES - 1:
      e = endings[int(rng.integers(len(endings)))]
      if e != right and e not in wrong:
        wrong.append(e)
    choices = wrong + [right]
    perm = [int(i) for i in rng.permutation(CHOICES)]
    out.append({"context": verses[k - 1][2] + "\n" + " ".join(words[:-TAIL]),
                "choices": [choices[i] for i in perm], "answer": perm.index(CHOICES - 1)})
  return out
