"""Offline lm-eval tasks shipped with lmpress, built from the bundled Wikipedia text.

Every YAML in this folder is an lm-eval task config that reads local data only (a
``custom_dataset`` builder in `wiki.py`), so the harness runs without network access:

- ``lmpress_wiki_ppl``: rolling log-likelihood of each article of the ``wiki`` eval split
  (word and byte perplexity, bits per byte: lm-eval's per-document metrics, not the papers'
  token perplexity of `lmpress.eval.ppl`).
- ``lmpress_wiki_cloze``: LAMBADA-style: predict an article's last word from the rest of it
  (accuracy of the greedy continuation, perplexity of the word).
- ``lmpress_wiki_mc``: match a title with its Wikipedia short description among four (three
  distractor descriptions drawn, seeded, from other eval articles); acc and acc_norm.

`TASKS_DIR` is this folder: pass it (or your own folders of YAMLs) to lm-eval's `TaskManager`
as an ``include_path``; `lmpress.eval.harness` does that for you.
"""
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
BUILTIN_TASKS = ("lmpress_wiki_ppl", "lmpress_wiki_cloze", "lmpress_wiki_mc")

__all__ = ["TASKS_DIR", "BUILTIN_TASKS"]
