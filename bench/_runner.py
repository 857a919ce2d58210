"""The bench driver: every configuration in its own subprocess, one JSON row each.

A bench script is a list of configurations plus two functions, and ends with one call:

    def run_one(config: str, args) -> dict:   # runs in the child: load, compress, measure; returns the row
    def table(rows: list[dict], args) -> str:  # runs in the parent: the Markdown table of the finished rows

    if __name__ == "__main__":
        _runner.main(run_one, table, doc=__doc__, configs="base,rtn-g64", add_args=my_args, check=recipe_for)

`main` parses the command line (the script's own options from `add_args`, plus the driver's:
`--configs`, `--repeats`, `--threads`, `--json`, `--jsonl`, `--budget`, and the internal
`--only`), then runs each configuration as `python <script> <the same argv> --only <config>`
in a fresh process, configurations alternating when repeated (A,B,C,A,B,C...). The child sets
its torch threads (OMP_NUM_THREADS / MKL_NUM_THREADS are set in its environment before it
starts), calls `run_one` and prints its row as one `ROW <json>` line on stdout; `partial(row)`
prints a `PARTIAL <json>` line, which stands in for the row if the child dies later. Other
stdout and all stderr of the child pass through to the parent's stderr.

Each row gets, from the driver: `config`, `repeat`, `threads`, `args`, `versions` (python, torch,
transformers, lmpress, git commit, library tree, CPU model), `wall_s` (the whole child process), `cpu_s` (its user +
system time, and its children's, from wait4), `max_rss_mib` (its peak resident set, from wait4),
`loadavg_start` / `loadavg_end` (os.getloadavg, 1/5/15 min). A configuration that fails becomes
a row with `error` (exit status and the last stderr line; `stderr_tail` keeps the last lines)
and the run goes on. Rows are written as they finish: `--jsonl FILE` appends one JSON line a
row, `--json FILE` rewrites {"args", "rows"[, "summary"]}. `--budget MIN` stops the run MIN
minutes after it started: the child running then is killed and what was left gets error rows.
`--resume` (with `--jsonl`) carries a run over several sittings: a configuration whose row is
already in the file, without error, measured with the same options (`args`, every option but the
driver's) on the same clean library tree (`versions.lib_tree`: the git objects of the library
folders, so bench, test and doc commits do not count) is taken from there, marked `resumed`.

Helpers for `run_one`: `rss_mib()` (this process's peak RSS so far), `RssPeak` (the peak RSS
sampled while a `with` block runs), `partial(row)`, `versions()`.
"""
from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import json
import logging
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time

ROW, PARTIAL = "ROW ", "PARTIAL "
TAIL = 20  # stderr lines kept for an error row
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def default_threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count() or 1


def protocol_args(p: argparse.ArgumentParser, *, n: int = 128, windows: int = 64, calib_seqlen: bool = False) -> None:
    """The options every perplexity bench shares: --model, --n, --seqlen, --windows, --seed
    (and --calib-seqlen where calibration and eval lengths are set apart)."""
    p.add_argument("--model", default="smollm2-135m", help="built-in name (tiny-llama for a smoke run), HF dir or .gguf")
    p.add_argument("--n", type=int, default=n, help=f"calibration sequences (default {n})")
    p.add_argument("--seqlen", type=int, default=512,
                   help="tokens per eval window" + ("" if calib_seqlen else " and per calibration sequence") + " (default 512)")
    if calib_seqlen:
        p.add_argument("--calib-seqlen", type=int, default=512, help="calibration sequence length (default 512)")
    p.add_argument("--windows", type=int, default=windows, help=f"perplexity windows (default {windows})")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")


# --------------------------------------------------------------------------- helpers for run_one


def rss_mib() -> float:
    """This process's peak resident set so far, MiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssPeak:
    """Largest resident set (`.peak` bytes, `.mib`) sampled every `every` s while the `with` block runs."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @property
    def mib(self) -> float:
        return self.peak / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.every)

    def __enter__(self):
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def compress_timed(model, tok, recipe, args, source: str = "wiki") -> float:
    """Sample the calibration set (`args.n` x `args.seqlen`, `args.seed`, from `source`, a source or a
    mix of `sample_calibration`) when the recipe calibrates, compress `model` in place; returns the
    compression seconds (sampling excluded)."""
    from lmpress.calibration.data import sample_calibration
    from lmpress.compress import compress

    calib = sample_calibration(tok, source, n=args.n, seqlen=args.seqlen, seed=args.seed) if recipe.needs_calibration else None
    t0 = time.perf_counter()
    compress(model, recipe, calib)
    return time.perf_counter() - t0


def packed_check(model, args) -> dict:
    """Save `model` (lmpress `save`) to a temporary folder and reload it: {"checkpoint_mib": the
    safetensors' MiB, "packed_equal": whether the reloaded packed model's logits on one window of
    `args.seqlen` random tokens equal the simulated model's}."""
    import tempfile

    import torch

    from lmpress.compress import load, save

    with tempfile.TemporaryDirectory(prefix="lmpress-bench-") as d:
        out = save(model, os.path.join(d, "ckpt"))
        x = torch.randint(0, model.config.vocab_size, (1, args.seqlen), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            equal = bool(torch.equal(model(x).logits, load(out)(x).logits))
        return {"checkpoint_mib": sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20, "packed_equal": equal}


def wiki_ppl(model, tok, args) -> dict:
    """{"ppl", "windows", "eval_s"}: perplexity on the wiki eval split, the first `args.windows`
    windows of `args.seqlen` tokens."""
    from lmpress.calibration.data import load_text
    from lmpress.eval.ppl import perplexity

    t0 = time.perf_counter()
    res = perplexity(model, tok, load_text("wiki", "eval"), seqlen=args.seqlen, windows=args.windows)
    return {"ppl": res.ppl, "windows": res.windows, "eval_s": time.perf_counter() - t0}


def partial(row: dict) -> None:
    """Emit `row` now: the parent keeps it (with a `note`) if this child fails before its ROW."""
    print(PARTIAL + json.dumps(row, default=str), flush=True)


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _commit() -> str | None:
    """The repository's HEAD (12 hex), `+dirty` when tracked files differ from it; None outside git."""
    def git(*a):
        return subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


LIB_PATHS = ("calibration", "compress", "eval", "kernels", "prune", "quant", "pyproject.toml", "constraints.txt")


@functools.lru_cache(maxsize=None)
def lib_tree(commit: str = "HEAD") -> str | None:
    """12 hex naming the library code at `commit` (the git objects of `LIB_PATHS`; `+dirty` when HEAD's
    working tree differs there): rows measured on equal trees measure the same library, whatever else
    changed (benches' tables, tests, docs). None outside git."""
    def git(*a):
        return subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True, timeout=30)

    try:
        ids = [git("rev-parse", f"{commit}:{path}") for path in LIB_PATHS]
        if any(r.returncode != 0 for r in ids):
            return None
        tree = hashlib.sha256(" ".join(r.stdout.strip() for r in ids).encode()).hexdigest()[:12]
        dirty = commit == "HEAD" and git("status", "--porcelain", "--untracked-files=no", "--", *LIB_PATHS).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return tree + ("+dirty" if dirty else "")


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name and its widest vector ISA, "Intel(R) Xeon(R) Processor (amx)" (/proc/cpuinfo;
    `platform.processor()` elsewhere): timings and even the last digits of a float result depend on it,
    and the machine can change between sittings of a run."""
    name, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name is None:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = next((i for i, flag in (("amx", "amx_int8"), ("avx512", "avx512f"), ("avx2", "avx2")) if flag in flags), None)
    name = name or platform.processor() or platform.machine()
    return f"{name} ({isa})" if isa else name


def versions(*extra: str) -> dict:
    """python, torch, transformers, lmpress (and the `extra` distributions) as installed, the git commit,
    the library tree (`lib_tree`) and the CPU (`cpu_model`)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "lmpress", *extra):
        out[name] = _dist_version(name)
    out["commit"] = _commit()
    out["lib_tree"] = lib_tree()
    out["cpu"] = cpu_model()
    return out


DRIVER_ARGS = ("configs", "repeats", "json", "jsonl", "budget", "only", "resume")


def protocol(args) -> dict:
    """The parsed options that shape a row (every option but the driver's own, which choose what runs)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in DRIVER_ARGS}


def resumable(path: str | None, args) -> dict[str, dict]:
    """{config: row} of the rows in the JSON-lines file `path` that this run may reuse: no error, the same
    options (`protocol`) and the same clean library tree as now."""
    tree = lib_tree()
    if not path or not os.path.exists(path) or tree is None or tree.endswith("+dirty"):
        return {}
    want = json.loads(json.dumps(protocol(args), default=str))
    out = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if ("error" not in row and row.get("args") == want and row.get("repeat", 0) == 0
                    and (row.get("versions") or {}).get("lib_tree") == tree):
                out[row["config"]] = row
    return out


# --------------------------------------------------------------------------- the child


def _child(config: str, args, run_one) -> None:
    import torch

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"[{config}] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    row = {"config": config}
    row.update(run_one(config, args))
    row.setdefault("versions", versions())
    row["versions"].setdefault("lib_tree", lib_tree())
    row["args"] = json.loads(json.dumps(protocol(args), default=str))
    row["threads"] = torch.get_num_threads()
    print(ROW + json.dumps(row, default=str), flush=True)


# --------------------------------------------------------------------------- the parent


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session: this takes its children too
    except ProcessLookupError:
        pass


def _pump(stream, tail: collections.deque) -> None:
    for line in stream:
        sys.stderr.write(line)
        sys.stderr.flush()
        if line.strip():
            tail.append(line.rstrip("\n"))


def _spawn(cmd: list[str], env: dict, deadline: float | None) -> dict:
    """Run one child to its end (or to `deadline`, time.monotonic()); its row plus the driver's figures."""
    load0, t0 = os.getloadavg(), time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    tail: collections.deque = collections.deque(maxlen=TAIL)
    pump = threading.Thread(target=_pump, args=(proc.stderr, tail), daemon=True)
    pump.start()
    killed = threading.Event()
    timer = None
    if deadline is not None:
        timer = threading.Timer(max(0.0, deadline - t0), lambda: (killed.set(), _kill(proc)))
        timer.start()
    found: dict[str, dict] = {}
    try:
        for line in proc.stdout:
            kind = next((k for k in (ROW, PARTIAL) if line.startswith(k)), None)
            if kind is None:
                sys.stderr.write(line)  # the child's own prints
                continue
            try:
                found[kind] = json.loads(line[len(kind):])
            except json.JSONDecodeError:
                tail.append(f"unreadable {kind.strip()} line: {line[:200]}")
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # Ctrl-C, or anything else: take the child down with us
        _kill(proc)
        raise
    finally:
        if timer is not None:
            timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    pump.join(timeout=5)
    row = found.get(ROW)
    if row is None or proc.returncode != 0:
        why = (f"killed at the end of the --budget, after {time.monotonic() - t0:.0f} s" if killed.is_set()
               else f"exit {proc.returncode}" + (f": {tail[-1]}" if tail else ""))
        if PARTIAL in found:
            row = {**found[PARTIAL], "note": why}
        else:
            row = {"error": why}
        row.update(exit_code=proc.returncode, stderr_tail=list(tail))
    row.update(wall_s=round(time.monotonic() - t0, 2), cpu_s=round(usage.ru_utime + usage.ru_stime, 2),
               max_rss_mib=round(usage.ru_maxrss / 1024, 1), loadavg_start=[round(x, 2) for x in load0],
               loadavg_end=[round(x, 2) for x in os.getloadavg()])
    return row


def _one(config: str, cmd: list[str], args, env, deadline: float | None) -> dict:
    """The row of one configuration: its child's, or an error row when its environment cannot be made
    (a peer that does not install) or the budget is spent."""
    child_env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    t0 = time.monotonic()

    def spent() -> bool:
        return deadline is not None and time.monotonic() >= deadline

    row = None
    if not spent():  # checked before `env` too: a spent budget installs no peer
        try:
            child_env.update((env(config, args) if env is not None else None) or {})
        except Exception as e:  # say why in one line, go on with the other configurations
            lines = str(e).strip().splitlines()
            row = {"error": f"{type(e).__name__}: {lines[-1] if lines else ''}"}
    if row is None and spent():
        row = {"error": f"not run: the --budget of {args.budget:g} min was spent"}
    if row is None:
        setup_s = round(time.monotonic() - t0, 2)  # before the child runs
        return {**_spawn(cmd, child_env, deadline), "setup_s": setup_s}
    load = [round(x, 2) for x in os.getloadavg()]
    return {**row, "setup_s": round(time.monotonic() - t0, 2), "wall_s": 0.0, "cpu_s": 0.0, "max_rss_mib": 0.0,
            "loadavg_start": load, "loadavg_end": load}


def _brief(row: dict) -> str:
    if "error" in row:
        return f"failed: {row['error']}"
    shown = [f"{k} {row[k]:.4g}" for k in ("ppl", "compress_s") if isinstance(row.get(k), (int, float))]
    return ", ".join(shown + [f"wall {row['wall_s']:.0f}s", f"cpu {row['cpu_s']:.0f}s", f"max RSS {row['max_rss_mib']:.0f} MiB"])


def runs_table(rows: list[dict]) -> str:
    """What the driver measured of every child: time, CPU, memory, machine load."""
    lines = ["| config | repeat | wall s | cpu s | max RSS MiB | threads | load 1 min start / end |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['repeat']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['max_rss_mib']:.0f} | "
                     f"{r.get('threads', '-')} | {r['loadavg_start'][0]:.2f} / {r['loadavg_end'][0]:.2f} |")
    return "\n".join(lines)


def _write(path: str | None, args, rows: list[dict], summary) -> None:
    if not path:
        return
    out = {"args": vars(args), "rows": rows}
    if summary is not None:
        out["summary"] = summary(rows, args)
    with open(path, "w") as f:
        json.dump(out, f, indent=2, default=str)


def _parser(doc: str, configs: str, configs_help: str | None, add_args, threads: int | None) -> argparse.ArgumentParser:
    head, _, rest = doc.strip().partition("\n\n")
    p = argparse.ArgumentParser(description=head, epilog=rest or None, formatter_class=argparse.RawDescriptionHelpFormatter)
    if add_args is not None:
        add_args(p)
    g = p.add_argument_group("driver (bench/_runner.py)")
    g.add_argument("--configs", default=configs, help=configs_help or f"comma-separated (default {configs})")
    g.add_argument("--repeats", type=int, default=1, help="run the list N times, alternating (A,B,C,A,B,C...)")
    g.add_argument("--threads", type=int, default=threads or default_threads(),
                   help="torch threads and OMP/MKL_NUM_THREADS of every child (default %(default)s)")
    g.add_argument("--json", default=None, help="also write {args, rows} to this JSON file (rewritten as rows finish)")
    g.add_argument("--jsonl", default=None, help="also append every row to this file, one JSON line a row")
    g.add_argument("--budget", type=float, default=None, help="minutes: stop the run (and kill the child running) then")
    g.add_argument("--resume", action="store_true", help="reuse the rows of --jsonl measured with the same options on the "
                   "same library tree (a run longer than one sitting); the others run")
    g.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: run one configuration here, print its ROW
    return p


def main(run_one, table, *, doc: str, configs: str, configs_help: str | None = None, add_args=None, check=None,
         prepare=None, env=None, summary=None, threads: int | None = None, errors_in_table: bool = False,
         argv: list[str] | None = None) -> list[dict] | None:
    """Parse the command line and run the bench (see the module doc). Hooks, all optional:

    add_args(parser)        the script's own options
    check(config, args)     validate a configuration name in the parent (raise SystemExit with the known names)
    prepare(args)           runs in the parent and in every child after parsing (derived defaults); in the
                            parent it may return extra argv for the children (e.g. ["--work", DIR])
    env(config, args)       extra environment for that configuration's child (a peer's PYTHONPATH); an
                            exception here makes the row an error saying why, without starting the child
    summary(rows, args)     a JSON-able object stored under "summary" in --json
    errors_in_table         pass error rows to `table` (else they are listed after it by the driver)
    Returns the rows (None in a child)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser(doc, configs, configs_help, add_args, threads).parse_args(argv)
    extra = (prepare(args) if prepare is not None else None) or []
    if args.only:
        _child(args.only, args, run_one)
        return None

    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in names:
        if check is not None:
            check(c, args)
    script = os.path.abspath(sys.modules["__main__"].__file__)
    deadline = time.monotonic() + 60 * args.budget if args.budget else None
    rows: list[dict] = []
    if args.resume and not args.jsonl:
        raise SystemExit("--resume reads the rows of an earlier run from --jsonl FILE: give it")
    done = resumable(args.jsonl, args) if args.resume else {}
    for rep in range(args.repeats):
        for c in names:
            if rep == 0 and c in done:
                rows.append({**done[c], "resumed": True})
                print(f"  {c}: resumed from {args.jsonl} ({_brief(done[c])})", file=sys.stderr, flush=True)
                continue
            label = c if args.repeats == 1 else f"{c} (repeat {rep + 1}/{args.repeats})"
            print(f"[{time.strftime('%H:%M:%S')}] {label} ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, script, *argv, *extra, "--threads", str(args.threads), "--only", c]
            row = {"config": c, "repeat": rep, **_one(c, cmd, args, env, deadline)}
            rows.append(row)
            print(f"  {c}: {_brief(row)}", file=sys.stderr, flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(row, default=str) + "\n")
            _write(args.json, args, rows, summary)

    ok = rows if errors_in_table else [r for r in rows if "error" not in r]
    print(table(ok, args))
    failed = [] if errors_in_table else [r for r in rows if "error" in r]
    if failed:
        print("\nFailed configurations:\n" + "\n".join(f"- {r['config']}: {r['error']}" for r in failed))
    print("\nRuns (bench/_runner.py; wall and CPU of each child process, its peak RSS, machine load):\n")
    print(runs_table(rows))
    return rows
