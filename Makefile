# docqa: `make demo` and `make test` work from a fresh clone; each sets up what it needs first.
PYTHON ?= python3
# The CPU build of torch, installed before anything that depends on it (else pip pulls the CUDA build, several GB).
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO := demo

.PHONY: setup poppler test demo bench bench-gpu bench-s3 bench-corpus lint clean

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

poppler:
	@command -v pdftoppm >/dev/null 2>&1 || { \
		echo "installing poppler-utils (pdf2image backend)"; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q poppler-utils; }

setup: $(INSTALLED) poppler

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

$(DEMO)/tiny-idefics2/config.json: | $(INSTALLED)
	$(BIN)/docqa model tiny $(DEMO)/tiny-idefics2

demo: setup $(DEMO)/tiny-idefics2/config.json
	$(BIN)/python -m jobs.samples $(DEMO)/pdfs > /dev/null
	$(BIN)/docqa run --config examples/invoice.yaml --input $(DEMO)/pdfs --output $(DEMO)/out \
		--model $(DEMO)/tiny-idefics2
	$(BIN)/python -m jobs.preview $(DEMO)/out

# CPU stages, model stage, end to end, online endpoint; writes their output into BENCHMARKS.md.
bench: setup
	$(BIN)/python -m bench.report

# Full-size Idefics2-8B architecture, random weights, bf16, on a GPU machine.
bench-gpu: setup
	$(BIN)/python -m bench.gpu --json bench-gpu.json

bench-corpus: setup
	$(BIN)/python -m bench.corpus

bench-s3: setup
	$(BIN)/python -m bench.s3_bucket --documents 1000

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
