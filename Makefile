# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv from requirements.lock (all versions pinned) when it is missing or stale.
# INSTALLER=uv (default, fast) or INSTALLER=pip.
PYTHON ?= python3
VENV := .venv
INSTALLER ?= uv
UV_VERSION := 0.13.8
# Local wheel directories configured for pip (e.g. a CPU torch wheel); uv does not read pip's config.
FIND_LINKS := $(strip $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
UV_FLAGS := --compile-bytecode $(foreach d,$(FIND_LINKS),--find-links $(d))
CPU8 := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast lock clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.lock setup.py
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
ifeq ($(INSTALLER),uv)
	$(VENV)/bin/python -m pip install -q uv==$(UV_VERSION)
	$(VENV)/bin/python -m uv pip install --python $(VENV)/bin/python $(UV_FLAGS) -r requirements.lock
	$(VENV)/bin/python -m uv pip install --python $(VENV)/bin/python $(UV_FLAGS) --no-deps -e .
else
	$(VENV)/bin/python -m pip install -r requirements.lock
	$(VENV)/bin/python -m pip install --no-deps -e .
endif
	touch $@

demo: venv
	$(CPU8) $(VENV)/bin/ualm demo --run-dir runs/demo

# pytest exits 5 when no test was collected (e.g. a -k that matches nothing): not a failure.
# WORKERS=2 runs test files on both cores (pytest-xdist, a file per worker at a time, so module
# fixtures are built once); WORKERS=0 runs them one after another in this process.
WORKERS ?= 2
XDIST := $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist loadfile)
test: venv
	$(CPU8) $(VENV)/bin/python -m pytest tests $(XDIST) --durations=15 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# The unit tests only (tests/unit/, about 2 minutes on 2 cores); `make test` runs everything.
test-fast: venv
	$(CPU8) $(VENV)/bin/python -m pytest tests/unit $(PYTEST_ARGS)

# Re-resolve the pins from requirements.in (needs the package index).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -r requirements.in
	.lock-venv/bin/python -m pip freeze --exclude-editable > requirements.lock
	rm -rf .lock-venv

clean-venv:
	rm -rf $(VENV)
