"""Print pip constraints for the running venv: the lock file, except that torch's own family
(torch, triton, nvidia-*, cuda-*) is pinned to what the venv already holds, so a venv that came
with a (CUDA) torch keeps it. Without a lock file only that family is pinned (newest for the rest).

    .venv/bin/python .ci/pin.py constraints.txt > .venv/constraints.txt
    .venv/bin/python .ci/pin.py "" > .venv/constraints.txt          # no lock
"""
import re
import sys
from importlib.metadata import distributions

TORCH_FAMILY = re.compile(r"^(torch|triton|pytorch-triton.*|nvidia-.*|cuda-.*)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(lock: str) -> None:
    held = {canonical(d.metadata["Name"]): d.version for d in distributions()
            if TORCH_FAMILY.match(canonical(d.metadata["Name"]))}
    lines = []
    if lock:
        with open(lock) as f:
            for line in f:
                spec = line.split("#", 1)[0].strip()
                if not spec:
                    continue
                name = canonical(re.split(r"[=<>!~ ;\[]", spec, maxsplit=1)[0])
                if name not in held:
                    lines.append(spec)
    lines += [f"{name}=={version}" for name, version in sorted(held.items())]
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
