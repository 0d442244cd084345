"""Evaluation beyond the training loss: perplexity, multiple choice, generation, calibration.

- `suite`: suites of (kind, data, settings), checked and loaded before a model is read;
  `suites` the shipped ones, `cloze` their scripture cloze.
- `scoring`: log-likelihoods of many sequences, a shared context run once, the rest
  packed into rows; one compiled forward pass a batch.
- `metrics`: pass@k, expected calibration error, standard errors.
- `run`: `run_suite` on parameters in memory, the records, the table and the files
  (`plots`: reliability diagrams).
- `harness`: fmjax as a model of lm-evaluation-harness (needs the optional lm-eval),
  reading a run with `workdir`.
- `benchmark`: multiple-choice scoring speed against one forward pass per choice.

Used by `python -m fmjax.eval` on a checkpoint, and by a training loop on its
live parameters:

  entries = suite.load_suite("quick", data_dir=cfg.data.data_dir)   # once, up front
  records = run.run_suite(lora.merge(params, cfg.lora), spec, tokenizer, entries, mesh,
                          seq_len=cfg.data.seq_len, step=step)
"""
