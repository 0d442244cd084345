"""The shipped suites, all offline on the embedded data (fmjax.evaluation.suite has the format).

- default: perplexity on held-out KJV chapters, scripture cloze as multiple choice,
  and the three verifiable task families at the training level (in distribution)
  and at both held-out harder levels (out of distribution), with pass@k.
- quick: the same kinds on fewer examples and greedy answers only: minutes on a
  CPU, for evaluations inside a training run.
- addition: the written-out addition family that RL trains on
  (experiments/grpo_tiny.py), at its training level and both held-out ones,
  greedy and pass@k; its prompts fit a 64-token context.
"""

from fmjax.data import tasks


def _tasks(examples: int, n: int, k: list[int], max_new_tokens: int) -> list[dict]:
  return [dict(kind="generation", data=family,
               settings=dict(level=level, examples=examples, n=n, k=k if n else None,
                             temperature=0.8, max_new_tokens=max_new_tokens))
          for level in tasks.LEVELS for family in tasks.TASKS]


DEFAULT = [
    dict(kind="perplexity", data="kjv", settings=dict(split="validation", documents=30)),
    dict(kind="multiple_choice", data="kjv_cloze", settings=dict(examples=200)),
] + _tasks(examples=30, n=4, k=[1, 4], max_new_tokens=64)

QUICK = [
    dict(kind="perplexity", data="kjv", settings=dict(split="validation", documents=8)),
    dict(kind="multiple_choice", data="kjv_cloze", settings=dict(examples=50)),
] + _tasks(examples=10, n=0, k=[], max_new_tokens=48)

ADDITION = [dict(kind="generation", data="addition",
                 settings=dict(level=level, examples=100, n=4, k=[1, 4], temperature=0.8,
                               max_new_tokens=40))
            for level in tasks.LEVELS]

SUITES = {"default": DEFAULT, "quick": QUICK, "addition": ADDITION}
