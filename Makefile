# Neuron Atlas: `make site` builds the demo atlas, `make test` runs the tests.
# Both create .venv and install the project first (offline-safe: torch and
# torchvision are pinned to the builds on this machine's disk).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= examples/demo.toml
PORT ?= 8000
STAMP := $(VENV)/.installed
NPM_STAMP := web/node_modules/.installed

.PHONY: site test serve bench clean install

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# The SQL page's engine (DuckDB-WASM, parquet-wasm) and axe-core, as web/package-lock.json pins them. Without
# npm, or without the registry, the site is built all the same: its SQL page says the engine is not bundled.
$(NPM_STAMP): web/package.json web/package-lock.json
	@if ! command -v npm >/dev/null 2>&1; then \
	  echo "npm not found: the SQL page will lack its query engine (install Node.js and npm, then run make again)"; \
	elif npm ci --prefix web --no-audit --no-fund --loglevel=error; then touch $(NPM_STAMP); \
	else echo "npm ci --prefix web failed: the SQL page will lack its query engine (run make again with the npm registry reachable)"; fi

# the demo is two atlases in one site: the language model's (examples/demo-text.toml, into site/text/) first,
# so that the digits atlas's home page (site/) finds it and lists it
site: $(STAMP) $(NPM_STAMP)
	@if [ "$(CONFIG)" = examples/demo.toml ]; then $(BIN)/atlas build examples/demo-text.toml; fi
	$(BIN)/atlas build $(CONFIG)

HF_STAMP := $(VENV)/.hf-installed

# the tests also cover `hf:` language models: the optional extra `hf` (transformers), not needed by `make site`
$(HF_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,hf]'
	touch $(HF_STAMP)

test: $(STAMP) $(HF_STAMP) $(NPM_STAMP)
	$(BIN)/python -m pytest -q

serve:
	@echo "serving site/ at http://127.0.0.1:$(PORT)/ (Ctrl-C to stop)"
	$(BIN)/python -m http.server --directory site --bind 127.0.0.1 $(PORT)

BENCH_STAMP := $(VENV)/.bench-installed

# torch-lucent 0.1.8 pins kornia<=0.4.1 and test tools it never imports: install it alone, then what it needs.
$(BENCH_STAMP): $(STAMP) $(HF_STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps torch-lucent==0.1.8
	$(BIN)/python -m pip install --quiet --disable-pip-version-check kornia==0.9.0 decorator ipython
	touch $(BENCH_STAMP)

# every bench/*.py except helpers (bench/_*.py); each ends with its FIGURE lines
bench: $(BENCH_STAMP)
	@set -e; for script in bench/[!_]*.py; do echo "== $$script"; $(BIN)/python "$$script"; done

clean:
	rm -rf site data/demo
