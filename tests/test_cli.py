import json

import pytest
from typer.testing import CliRunner

from lmpress.cli.main import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_recipes_and_models_list():
    res = run("recipes")
    assert res.exit_code == 0 and "w8a8-rtn" in res.output and "w4a16-rtn" in res.output
    res = run("models")
    assert res.exit_code == 0 and "smollm2-135m" in res.output and "tiny-llama" in res.output


def test_compress_and_eval_inspect_eval(tmp_path, text_file):
    out = tmp_path / "art"
    res = run("compress-and-eval", "tiny-llama", "--recipe", "w4a16-rtn", "--out", out,
              "--eval-data", text_file, "--calib", text_file, "--seqlen", 32, "--windows", 2,
              "--tasks", "none", "--no-latency")
    assert res.exit_code == 0, res.output
    assert "perplexity (base)" in res.output and "perplexity (compressed)" in res.output
    report = json.loads((out / "report.json").read_text())
    assert report["eval"]["windows"] == 2 and report["recipe"] == "w4a16-rtn"
    assert report["base"]["ppl"] > 1 and report["compressed"]["ppl"] > 1
    assert 4 < report["bits_per_weight"] < 5.5
    assert report["compression"]["summary"]["quantized_modules"] == 14

    res = run("inspect", out)
    assert res.exit_code == 0, res.output
    assert "model.layers.1.mlp.down_proj" in res.output and "bits/weight" in res.output
    res = run("inspect", out, "--json")
    assert json.loads(res.output)["modules"]

    res = run("eval", out, "--data", text_file, "--seqlen", 32, "--windows", 2)
    assert res.exit_code == 0, res.output
    assert f"{report['compressed']['ppl']:.4f}" in res.output

    # the same directory again without --overwrite: refused before any work, output kept
    res = run("compress", "tiny-llama", "--out", out)
    assert res.exit_code == 2 and "already exists" in res.output
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "args, needle",
    [
        (("compress", "tiny-llama", "--recipe", "nope"), "unknown recipe 'nope'"),
        (("compress", "/no/such/model"), "no such file or directory"),
        (("inspect", "/no/such/dir"), "not a directory"),
        (("eval", "tiny-llama", "--data", "/no/such.txt"), "/no/such.txt"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, args, needle):
    res = run(*args, *(("--out", tmp_path / "o") if args[0] == "compress" else ()))
    assert res.exit_code == 2
    assert needle in res.output
    assert "Traceback" not in res.output


def test_compress_with_a_calibration_mix_records_it_and_bad_mixes_are_one_line(tmp_path, text_file):
    other = tmp_path / "other.txt"
    other.write_text("An unrelated text about rivers, bridges and the sea. " * 40)
    out = tmp_path / "mix"
    res = run("compress", "tiny-llama", "--recipe", "w4a16-squeezellm", "--out", out, "--calib", f"{text_file}@3+{other}",
              "--n", 4, "--seqlen", 32)
    assert res.exit_code == 0, res.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["calibration"]["source"] == f"{text_file}@3+{other}" and qc["calibration"]["n"] == 4
    assert qc["lmpress"]["codebooks"]["modules"]
    res = run("compress", "tiny-llama", "--recipe", "w4a16-squeezellm", "--out", tmp_path / "bad", "--calib",
              f"{text_file}@0+{other}", "--n", 4, "--seqlen", 32)
    assert res.exit_code == 2 and "SOURCE@WEIGHT" in res.output.strip().splitlines()[-1]  # one line, after the progress
    assert not (tmp_path / "bad").exists()
