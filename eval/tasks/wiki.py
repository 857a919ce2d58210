"""Documents of the bundled wiki tasks, built from the eval split of the bundled summaries.

The eval split is `lmpress.calibration.data`'s: articles whose ``md5(title) % 10 == 0`` (1,010
of the 10,033 articles), never used for calibration. Each builder returns a
``datasets.DatasetDict`` with one ``test`` split, shuffled with a fixed seed so that lm-eval's
``limit`` (the first N documents) is a sample across topics rather than the file's first
letters. lm-eval calls the builders through ``custom_dataset: !function`` with the task's
``metadata`` and ``dataset_kwargs`` as keyword arguments; only ``seed`` is read.

Fields used from ``summaries_en-us.json``: ``title``, ``extract`` (the article's lead section)
and ``description`` (Wikipedia's own short description, e.g. "1968 film by Stanley Kubrick";
998 of the 1,010 eval articles have a non-empty one; the others are left out of the
multiple-choice task).
"""
from __future__ import annotations

import random
import re

DEFAULT_SEED = 1234
N_CHOICES = 4
_TRAILING_PUNCT = re.compile(r"[.,;:!?)\]\"'»”’]+$")


def _eval_records() -> list[dict]:
    """(title, extract, description) of every eval-split article, in file order."""
    import json

    from lmpress.calibration.data import is_eval_title, wiki_path

    data = json.loads(wiki_path().read_text(encoding="utf-8"))  # {title: {title, extract, description, topic}}
    out = []
    for key, entry in data.items():
        title = entry.get("title", key)
        if is_eval_title(title):
            out.append({"title": title, "text": entry["extract"].strip(),
                        "description": (entry.get("description") or "").strip()})
    return out


def _shuffled(rows: list[dict], seed: int) -> list[dict]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def _dataset(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def ppl_docs(seed: int = DEFAULT_SEED) -> list[dict]:
    """One document per eval article: its whole extract."""
    return _shuffled([{"title": r["title"], "text": r["text"]} for r in _eval_records()], seed)


def cloze_docs(seed: int = DEFAULT_SEED) -> list[dict]:
    """LAMBADA-style: the extract without its last word, and that word (trailing punctuation
    stripped). Articles whose last word is not alphabetic (years, "(1949).") are left out."""
    rows = []
    for r in _eval_records():
        head, _, last = r["text"].rpartition(" ")
        word = _TRAILING_PUNCT.sub("", last)
        if head and len(word) >= 2 and word.isalpha():
            rows.append({"title": r["title"], "context": head, "target": word})
    return _shuffled(rows, seed)


def mc_docs(seed: int = DEFAULT_SEED) -> list[dict]:
    """Title → short description, one true and three distractors from other eval articles.

    Each article's distractors and answer position come from ``random.Random(f"{seed}:{title}")``,
    so they do not depend on the document order or on the limit."""
    recs = [r for r in _eval_records() if r["description"]]
    rows = []
    for r in recs:
        rng = random.Random(f"{seed}:{r['title']}")
        gold = r["description"]
        seen = {gold.casefold()}
        distractors = []
        while len(distractors) < N_CHOICES - 1:
            cand = rng.choice(recs)["description"]
            if cand.casefold() not in seen:
                seen.add(cand.casefold())
                distractors.append(cand)
        answer = rng.randrange(N_CHOICES)
        choices = distractors[:answer] + [gold] + distractors[answer:]
        rows.append({"title": r["title"], "query": f"Wikipedia article: {r['title']}\nShort description:",
                     "choices": choices, "gold": answer})
    return _shuffled(rows, seed)


# --------------------------------------------------------------------------- lm-eval hooks


def ppl_dataset(seed: int = DEFAULT_SEED, **_):
    return _dataset(ppl_docs(seed))


def cloze_dataset(seed: int = DEFAULT_SEED, **_):
    return _dataset(cloze_docs(seed))


def mc_dataset(seed: int = DEFAULT_SEED, **_):
    return _dataset(mc_docs(seed))


def ppl_results(doc: dict, results) -> dict:
    """Per-document figures for lm-eval's weighted perplexity aggregations (as its wikitext)."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"]))
    nbytes = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, nbytes),
            "bits_per_byte": (loglikelihood, nbytes)}
