# Set-up, tests and the demo. Every target is idempotent; `make setup` is quick once done.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup zpaq browser test train chat bench lint format clean

setup: $(STAMP) zpaq

# A torch >= 2.4 the user already has (system site-packages) is kept; otherwise the pinned
# CPU wheel, which this machine serves locally. Never an unpinned torch: that pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import sys, torch; sys.exit(tuple(map(int, torch.__version__.split('.')[:2])) < (2, 4))" 2>/dev/null \
		|| $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# zpaq -m5, a context-mixing compressor, is the strong baseline beside xz's (data/baselines.py): Debian's
# package, installed with apt-get when missing and possible (root, or sudo without a password); otherwise
# the figure is left out and nothing fails.
ZPAQ := $(shell command -v zpaq)
zpaq:
ifeq ($(ZPAQ),)
	@if command -v apt-get >/dev/null && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then \
		echo "installing zpaq for the compression baseline (apt-get)"; \
		{ $(SUDO) apt-get install -y -qq zpaq >/dev/null 2>&1 \
		  || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq zpaq >/dev/null; }; } \
		|| echo "could not install zpaq: the zpaq baseline is left out"; \
	else echo "no zpaq (and no apt-get as root or passwordless sudo): the zpaq baseline is left out"; fi
endif

# The playground's test drives Debian's chromium through Playwright's Python API (never a browser download):
# installed with apt-get when missing (CI runs as root on a fresh Debian machine; elsewhere through sudo).
CHROMIUM := $(firstword $(wildcard /usr/bin/chromium /usr/bin/chromium-browser))
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
ifeq ($(CHROMIUM),)
	@if command -v apt-get >/dev/null; then \
		echo "installing chromium for the browser test (apt-get)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; \
	else echo "no apt-get: install chromium yourself for the browser test (it is skipped without it, outside CI)"; fi
endif

# llama.cpp for the GGUF parity tests (tests/test_gguf_llama_cpp.py): llama-cpp-python built from source for
# this CPU. The first build takes minutes (see README); pip keeps the wheel, so later set-ups take seconds.
# Only `make test` waits for it: `make train` and `export --format gguf` need none of it.
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
LLAMA_CPP_STAMP := $(VENV)/.llama-cpp-installed
$(LLAMA_CPP_STAMP): $(STAMP)
	$(PY) -m pip install -q $(LLAMA_CPP_PYTHON)
	touch $(LLAMA_CPP_STAMP)

# the test suite's heavy clients (pyproject's `test` extra: lm-evaluation-harness with its backends' dependencies)
TEST_STAMP := $(VENV)/.test-installed
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,test]'
	touch $(TEST_STAMP)

test: setup browser $(LLAMA_CPP_STAMP) $(TEST_STAMP)
	$(PY) -m pytest -q

# the built-in demo: prepare the built-in corpus (once), train the seed architecture for ~7 minutes on
# CPU, evaluate, print samples, save under runs/demo
train: setup
	$(PY) -m deepseek_lm train

# chat with the demo model: pretrain it if runs/demo has no checkpoint (~7 min), fine-tune it on the built-in
# instruction set if runs/chat has none (~3 min on CPU), then a terminal chat (Ctrl-C stops a reply, Ctrl-D quits)
chat: setup
	test -e runs/demo/latest || $(PY) -m deepseek_lm train
	test -e runs/chat/latest || $(PY) -m deepseek_lm finetune --checkpoint runs/demo --out runs/chat
	$(PY) -m deepseek_lm generate --checkpoint runs/chat --chat

# training and decoding throughput, side by side with transformers (a few minutes on 2 cores)
bench: setup
	$(PY) -m deepseek_lm bench --compare-hf

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
