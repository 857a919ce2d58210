import json

import pytest
from typer.testing import CliRunner

from lmpress.cli.main import app
from lmpress.eval.recovery import Thresholds, check, recoveries, recovery
from lmpress.eval.report import compare, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def test_recovery_is_direction_aware():
    assert recovery(10.0, 12.5, higher_is_better=False) == pytest.approx(0.8)  # perplexity up 25%: worse
    assert recovery(0.5, 0.4, higher_is_better=True) == pytest.approx(0.8)  # accuracy down: worse
    assert recovery(0.5, 0.5, True) == 1.0 and recovery(0.0, 0.0, True) == 1.0
    assert recovery(0.0, 0.3, True) is None and recovery(None, 1.0, True) is None
    assert recoveries({"ppl": 10, "t/acc": 0.5, "only_base": 1}, {"ppl": 11, "t/acc": 0.5},
                      {"ppl": False, "t/acc": True}) == {"ppl": pytest.approx(10 / 11), "t/acc": 1.0}


def test_thresholds_yaml_and_precedence(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("min_recovery: 0.95\nmetrics:\n  ppl: 0.99\n  task_a: 0.5\n  task_a/acc: 0.8\n  latency/ttft_s: 0.1\n  missing/acc: 0.9\n")
    t = Thresholds.load(f)
    assert t.minimum_for("ppl") == 0.99 and t.minimum_for("task_a/acc") == 0.8
    assert t.minimum_for("task_a/acc_norm") == 0.5 and t.minimum_for("task_b/acc") == 0.95
    assert t.minimum_for("latency/ttft_s") == 0.1 and t.minimum_for("latency/prefill_tok_s") is None
    assert Thresholds.load(f, min_recovery=0.5).minimum_for("task_b/acc") == 0.5  # the command line wins
    verdict = check({"ppl": 0.995, "task_a/acc": 0.85, "task_a/acc_norm": 0.4, "latency/ttft_s": 0.2,
                     "latency/prefill_tok_s": 0.01}, t)
    by = {c["metric"]: c for c in verdict["checks"]}
    assert not verdict["passed"]
    assert by["ppl"]["passed"] and by["task_a/acc"]["passed"] and by["latency/ttft_s"]["passed"]
    assert not by["task_a/acc_norm"]["passed"]
    assert not by["missing/acc"]["passed"] and by["missing/acc"]["note"] == "not measured"
    assert "latency/prefill_tok_s" not in by  # latency is gated only when named
    f.write_text("min_recovery: 0.9\nmetric: {ppl: 1}\n")
    with pytest.raises(ValueError, match="unknown key"):
        Thresholds.load(f)
    with pytest.raises(ValueError, match="min_recovery"):
        Thresholds(min_recovery=-1)


def _fake_report(recipe: str, bits: float, ppl: float, passed: bool) -> dict:
    lat = {"prefill_tok_s": 100.0, "ttft_s": 0.05, "decode_tok_s": {"1": 20.0, "8": 80.0}, "weight_bytes": 2**20,
           "peak_bytes": 2**21, "device": "cpu"}
    return {
        "model": "m", "recipe": recipe, "eval": {"data": "wiki", "windows": 4, "seqlen": 64, "task_limit": 5},
        "base": {"ppl": 10.0, "latency": lat}, "compressed": {"ppl": ppl, "latency": {**lat, "weight_bytes": 2**19}},
        "metrics": {"base": {"ppl": 10.0, "t/acc": 0.5, "latency/prefill_tok_s": 100.0},
                    "compressed": {"ppl": ppl, "t/acc": 0.45, "latency/prefill_tok_s": 90.0},
                    "higher_is_better": {"ppl": False, "t/acc": True, "latency/prefill_tok_s": True}},
        "recovery": {"ppl": 10.0 / ppl, "t/acc": 0.9, "latency/prefill_tok_s": 0.5},
        "thresholds": {"passed": passed, "checks": [{"metric": "ppl", "min": 0.95, "recovery": 10.0 / ppl,
                                                     "passed": passed, "note": ""}]},
        "bits_per_weight": bits, "base_bits": 32, "checkpoint_bytes": 3 * 2**20,
        "compression": {"summary": {"quantized_modules": 2, "mean_sqnr_db": 20.0},
                        "modules": {"model.layers.0.mlp.down_proj": {"sqnr_db": 20.0},
                                    "model.layers.1.mlp.down_proj": {"sqnr_db": 22.0}}},
        "calibration": {"source": "wiki", "n": 4}, "versions": {"lmpress": "0"}, "machine": {"cpus": 2},
    }


def test_write_report_and_compare(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    md = write_report(a, _fake_report("r4", 4.25, 11.0, passed=True))
    write_report(b, _fake_report("r8", 8.1, 10.2, passed=False))
    text = md.read_text()
    assert "| ppl | ↓ | 10 | 11 | 0.9091 |" in text and "**Thresholds: PASSED**" in text
    for png in ("layer_error", "ppl_vs_bits", "latency"):
        assert f"(plots/{png}.png)" in text
        assert (a / "plots" / f"{png}.png").read_bytes()[:8] == PNG
    assert json.loads((a / "report.json").read_text())["plots"]["latency"] == "plots/latency.png"

    md2, header, rows = compare([a, b], tmp_path / "cmp")
    assert [r[2] for r in rows] == ["r4", "r8"] and "t/acc" in header
    assert rows[1][-1] == "FAIL" and rows[0][header.index("min recovery")] == 0.9  # quality only
    assert (tmp_path / "cmp" / "ppl_vs_bits.png").read_bytes()[:8] == PNG
    assert "r8" in md2.read_text()


def test_report_names_the_runtime_paths_and_flags_a_slower_model(tmp_path):
    r = _fake_report("r4", 4.25, 11.0, passed=True)
    r["compressed"]["latency"].update(kernel_paths={"cpu-int4pack": 6, "ref": 1}, threads=2)
    r["slower_than_base"] = {"prefill_tok_s": 0.5}
    text = write_report(tmp_path / "a", r).read_text()
    assert "`cpu-int4pack` × 6, `ref` × 1; torch threads: 2." in text
    assert "**The compressed model is slower than its base** on this machine: prefill_tok_s recovery 0.50" in text
    r["slower_than_base"] = {}
    assert "slower than its base" not in write_report(tmp_path / "b", r).read_text()
    with pytest.raises(FileNotFoundError, match="report.json"):
        compare([tmp_path], tmp_path / "cmp2")


def test_cli_threshold_gate_writes_the_report_then_fails(tmp_path, text_file):
    """An impossible threshold exits non-zero (1, not the bad-input 2) after writing the report;
    a reachable one exits 0; `lmpress report` compares both artifacts."""
    runner = CliRunner()
    common = ["tiny-llama", "--calib", text_file, "--eval-data", text_file, "--seqlen", 32, "--windows", 2, "--n", 4]
    thr = tmp_path / "thr.yaml"
    thr.write_text("metrics:\n  ppl: 50\n")
    bad = tmp_path / "bad"
    res = runner.invoke(app, ["compress-and-eval", *map(str, common), "--recipe", "w4a16-rtn", "--out", str(bad),
                              "--tasks", "lmpress_wiki_mc", "--task-limit", "2", "--latency-repeats", "1",
                              "--prompt-len", "16", "--thresholds", str(thr)])
    assert res.exit_code == 1, res.output
    assert "thresholds FAILED: ppl recovery" in res.output
    report = json.loads((bad / "report.json").read_text())
    assert report["thresholds"]["passed"] is False
    assert set(report["base"]["tasks"]["scores"]) == {"lmpress_wiki_mc"}
    assert report["base"]["latency"]["decode_tok_s"]["8"] > 0
    assert "**Thresholds: FAILED**" in (bad / "report.md").read_text()
    assert (bad / "plots" / "latency.png").is_file() and (bad / "model.safetensors").is_file()

    good = tmp_path / "good"
    res = runner.invoke(app, ["compress-and-eval", *map(str, common), "--recipe", "w8a8-rtn", "--out", str(good),
                              "--tasks", "none", "--no-latency", "--min-recovery", "0.5"])
    assert res.exit_code == 0, res.output
    assert "thresholds passed (1 checks)" in res.output

    res = runner.invoke(app, ["report", str(bad), str(good), "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    assert "w4a16-rtn" in res.output and "w8a8-rtn" in res.output and "FAIL" in res.output
    assert (tmp_path / "cmp" / "ppl_vs_bits.png").is_file()


def test_ci_workflow_uses_real_flags_and_valid_thresholds(tmp_path):
    """The CI job's command line and thresholds must stay in step with the CLI."""
    import re
    import textwrap
    from pathlib import Path

    import yaml

    wf = yaml.safe_load((Path(__file__).resolve().parents[1] / ".github" / "workflows" / "compress.yml").read_text())
    steps = wf["jobs"]["compress"]["steps"]
    run = next(s["run"] for s in steps if "compress-and-eval" in s.get("run", ""))
    helptext = CliRunner().invoke(app, ["compress-and-eval", "--help"], env={"COLUMNS": "300"}).output
    for flag in re.findall(r"(--[a-z-]+)", run):
        assert flag in helptext, flag
    script = next(s["run"] for s in steps if "thresholds.yaml" in s.get("run", "") and "cat >" in s["run"])
    body = textwrap.dedent(script.split("<<'YAML'\n", 1)[1].split("YAML", 1)[0])
    (tmp_path / "t.yaml").write_text(body)
    t = Thresholds.load(tmp_path / "t.yaml")
    assert t.minimum_for("ppl") == 0.97 and t.minimum_for("lmpress_wiki_mc/acc") == 0.8
    assert any(s.get("uses", "").startswith("actions/upload-artifact") and s.get("if") == "always()" for s in steps)
