# docqa: `make demo` and `make test` work from a fresh clone; each sets up what it needs first.
PYTHON ?= python3
# Every package of the CPU development/CI environment, pinned with hashes (`make lock` upgrades it on purpose).
LOCK := requirements-lock.txt
# Where the CPU build of torch comes from when locking (a local wheel here; else PyTorch's CPU index).
TORCH_FIND_LINKS ?= /opt/wheels
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
LATEST := .venv-latest
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO := demo

.PHONY: setup system-packages test test-slow test-latest lock demo docs bench bench-gpu bench-s3 bench-corpus lint clean

# Exactly the lock (hash-checked, no resolution), then docqa itself without its dependencies.
$(INSTALLED): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m pip check
	touch $@

# Re-resolve every package to the newest versions pyproject.toml allows and write the lock.
lock: $(INSTALLED)
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra bnb --upgrade --generate-hashes \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --find-links $(TORCH_FIND_LINKS) \
		--index-url https://pypi.org/simple --custom-compile-command "make lock" -o $(LOCK)

# The whole suite against the newest versions pyproject.toml allows, in its own venv: drift shows up here
# as a failing command, not as a broken fresh clone. What it resolved: $(LATEST)/resolved.txt.
test-latest: system-packages
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev,bnb]"
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/resolved.txt
	$(LATEST)/bin/python -m pytest -p no:cacheprovider

# Debian packages docqa runs with, each found by a program it provides: poppler-utils (the pdf2image backend),
# bubblewrap (the render helper's namespaces, render.isolation: strict), tesseract-ocr (its English language
# data: the OCR word layer on scans, read through PyMuPDF; more languages are tesseract-ocr-LANG packages);
# and that the tests drive the review page with: chromium and chromium-driver (headless, through Selenium).
SYSTEM_PACKAGES := pdftoppm:poppler-utils bwrap:bubblewrap tesseract:tesseract-ocr chromium:chromium \
	chromedriver:chromium-driver
system-packages:
	@missing=""; for pair in $(SYSTEM_PACKAGES); do \
		command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then echo "installing$$missing"; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $$missing; fi

setup: $(INSTALLED) system-packages

test: setup docs
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow"

# The docs site (docs/, mkdocs.yml) into build/site; --strict: a broken link or a page the build warns about
# fails it. The config reference is generated from the config models at build time (docs/hooks.py).
docs: $(INSTALLED)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The minutes-long end-to-end tests (`@pytest.mark.slow`); CI runs them after `make test`.
test-slow: setup
	$(BIN)/python -m pytest -m slow

$(DEMO)/tiny-idefics2/config.json: | $(INSTALLED)
	$(BIN)/docqa model tiny $(DEMO)/tiny-idefics2

demo: setup $(DEMO)/tiny-idefics2/config.json
	$(BIN)/python -m jobs.devtools.samples $(DEMO)/pdfs > /dev/null
	$(BIN)/docqa run --config examples/invoice.yaml --input $(DEMO)/pdfs --output $(DEMO)/out \
		--model $(DEMO)/tiny-idefics2
	$(BIN)/docqa table --output $(DEMO)/out
	$(BIN)/docqa runs --output $(DEMO)/out

# CPU stages, model stage, end to end, online endpoint; writes their output into BENCHMARKS.md.
bench: setup
	$(BIN)/python -m bench.report

# Full-size Idefics2-8B architecture, random weights, bf16, on a GPU machine; one JSON per section in bench-gpu/.
bench-gpu: setup
	test -d .bench-pages || $(BIN)/python -m bench.gpu pages .bench-pages
	$(BIN)/python -m bench.gpu run --pages-dir .bench-pages --out bench-gpu

bench-corpus: setup
	$(BIN)/python -m bench.corpus

bench-s3: setup
	$(BIN)/python -m bench.s3_bucket --documents 1000

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(DEMO) $(LATEST) .pytest_cache .ruff_cache build/site
