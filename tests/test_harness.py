import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmpress.calibration.data import is_eval_title, wiki_articles
from lmpress.eval.harness import run_tasks
from lmpress.eval.tasks import BUILTIN_TASKS, TASKS_DIR, wiki


def test_bundled_task_files_exist():
    for name in BUILTIN_TASKS:
        text = (TASKS_DIR / f"{name}.yaml").read_text()
        assert f"task: {name}" in text and "custom_dataset: !function" in text  # local data, no hub


def test_wiki_docs_come_from_the_eval_split_and_are_seeded():
    extracts = {t: x.strip() for t, x in wiki_articles()}
    ppl, cloze, mc = wiki.ppl_docs(), wiki.cloze_docs(), wiki.mc_docs()
    n_eval = sum(is_eval_title(t) for t in extracts)
    assert len(ppl) == n_eval and 900 < n_eval < 1100
    for docs in (ppl, cloze, mc):
        assert all(is_eval_title(d["title"]) for d in docs)  # never a calibration article
    assert {d["title"]: d["text"] for d in ppl} == {t: x for t, x in extracts.items() if is_eval_title(t)}

    for d in cloze[:50]:  # the context plus the target word is the article, minus trailing punctuation
        full = extracts[d["title"]]
        assert full.startswith(d["context"] + " " + d["target"]) and d["target"].isalpha()
        assert len(full) - len(d["context"] + " " + d["target"]) <= 3

    # multiple choice: the gold choice is the article's own short description, distractors are others'
    import json as _json

    from lmpress.calibration.data import wiki_path

    desc = {v.get("title", k): v["description"].strip() for k, v in _json.loads(wiki_path().read_text()).items()}
    eval_descs = {desc[t] for t in desc if is_eval_title(t) and desc[t]}
    for d in mc:
        assert len(d["choices"]) == 4 and len({c.casefold() for c in d["choices"]}) == 4
        assert d["choices"][d["gold"]] == desc[d["title"]]
        assert all(c in eval_descs for c in d["choices"])
    golds = [d["gold"] for d in mc]
    assert all(abs(golds.count(i) / len(golds) - 0.25) < 0.06 for i in range(4))  # answer position is not a tell

    # seeded: same seed, same documents; another seed, another order but the same set
    assert wiki.mc_docs() == mc
    other = wiki.mc_docs(seed=7)
    assert [d["title"] for d in other] != [d["title"] for d in mc]
    assert {d["title"] for d in other} == {d["title"] for d in mc}


def _user_task_dir(tmp_path, texts):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tdir = tmp_path / "tasks"
    tdir.mkdir()
    (tdir / "my_ppl.yaml").write_text(
        "task: my_ppl\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: loglikelihood_rolling\n"
        "test_split: test\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
        "metadata:\n  version: 1.0\n")
    return tdir


def test_user_task_dir_matches_a_direct_computation(tiny, tmp_path):
    """A user's task folder (dataset_path: json on a local file) runs offline, and lm-eval's
    byte perplexity equals exp(-Σ log p / Σ bytes) computed here from the model's logits."""
    model, tok = tiny
    texts = ["The quick brown fox jumps over the lazy dog.", "Sphinx of black quartz, judge my vow!",
             "Pack my box with five dozen liquor jugs."]
    res = run_tasks(model, tok, tasks=["my_ppl"], task_dirs=[_user_task_dir(tmp_path, texts)], batch_size=2)
    total_ll, total_bytes = 0.0, 0
    with torch.no_grad():
        for t in texts:  # lm-eval's rolling windows start with the BOS as context
            ids = torch.tensor([[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"]])
            logp = F.log_softmax(model(ids).logits[0, :-1].double(), -1)  # (T-1, vocab)
            total_ll += logp.gather(1, ids[0, 1:, None]).sum().item()
            total_bytes += len(t.encode())
    assert res.samples == {"my_ppl": 3}
    assert res.scores["my_ppl"]["byte_perplexity"] == pytest.approx(math.exp(-total_ll / total_bytes), rel=1e-4)
    assert res.higher_is_better["my_ppl"]["byte_perplexity"] is False


def test_bundled_tasks_on_simulated_and_packed_model_agree(tiny, tmp_path):
    """The three bundled tasks run on a fake-quant model and on its packed checkpoint (the
    runtime kernels' path): same documents, and the same scores up to float rounding."""
    from lmpress.compress import compress, load, save

    model, tok = tiny
    base = copy.deepcopy(model)
    compress(model, "w4a16-rtn")
    save(model, tmp_path / "art", tokenizer=tok)
    packed = load(tmp_path / "art")
    runs = {name: run_tasks(m, tok, limit=3, batch_size=4) for name, m in
            (("base", base), ("sim", model), ("packed", packed))}
    for r in runs.values():
        assert set(r.scores) == set(BUILTIN_TASKS) and set(r.samples.values()) == {3}
        assert 0 <= r.scores["lmpress_wiki_mc"]["acc"] <= 1 and r.scores["lmpress_wiki_ppl"]["bits_per_byte"] > 0
    sim, pk, b = runs["sim"].metrics(), runs["packed"].metrics(), runs["base"].metrics()
    for k in sim:
        assert pk[k] == pytest.approx(sim[k], rel=1e-3, abs=1e-6), k
    assert sim["lmpress_wiki_ppl/bits_per_byte"] != b["lmpress_wiki_ppl/bits_per_byte"]  # quantization did something


def test_bad_arguments(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(ValueError, match="limit"):
        run_tasks(model, tok, limit=0)
    with pytest.raises(FileNotFoundError, match="task directory"):
        run_tasks(model, tok, task_dirs=[tmp_path / "nope"])
