# `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build where no NVIDIA GPU is present; CI must never pull a multi-GB CUDA build.
# Override on other machines, e.g. `make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"`.
ifeq ($(shell command -v nvidia-smi 2>/dev/null),)
TORCH_SPEC ?= torch==2.13.0
else
TORCH_SPEC ?= torch
endif

# Linters for the deployment files (deploy/): their own venv so checkov's pins never touch the trainer's,
# npm-groovy-lint (needs a Java runtime at run time) under .tools/npm. Pinned in deploy/lint-requirements.txt.
TOOLS  := .tools

.PHONY: demo serve-demo test install tools lock clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

$(TOOLS)/.installed: deploy/lint-requirements.txt
	test -x $(TOOLS)/venv/bin/python || $(PYTHON) -m venv $(TOOLS)/venv
	$(TOOLS)/venv/bin/pip install -q -r deploy/lint-requirements.txt
	if command -v npm >/dev/null; then npm install -s --no-fund --no-audit --prefix $(TOOLS)/npm npm-groovy-lint@16.2.0; \
	  else echo "warning: npm not found: the Jenkinsfile lint test will be skipped" >&2; fi
	touch $@

tools: $(TOOLS)/.installed

# Regenerate deploy/docker/requirements.lock, the hash-pinned dependencies of the Docker image and the Jenkins
# pipeline: pyproject.toml's dependencies, `service` and `kubernetes` extras plus deploy/docker/requirements.in (torch). Run after
# changing a pin; pins already in the lock are kept unless LOCK_ARGS=--upgrade. Needs the image's Python (3.12) and
# PyPI; pip-tools goes into a throwaway venv. Local pip configuration (wheel folders, extra indexes, constraints) is
# ignored so the lock holds PyPI's files and hashes. Not run by CI.
LOCK_PYTHON ?= python3.12
LOCK_ARGS ?=
lock:
	tmp=$$(mktemp -d /tmp/lora-scripts-lock.XXXXXX) && trap 'rm -rf "$$tmp"' EXIT && \
	export PIP_CONFIG_FILE=/dev/null && unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_INDEX_URL PIP_CONSTRAINT && \
	$(LOCK_PYTHON) -m venv "$$tmp" && "$$tmp/bin/pip" install -q pip-tools==7.6.2 && \
	"$$tmp/bin/pip-compile" --quiet --generate-hashes --allow-unsafe --strip-extras --extra service --extra kubernetes \
	  --no-emit-index-url --no-emit-find-links $(LOCK_ARGS) --output-file deploy/docker/requirements.lock \
	  pyproject.toml deploy/docker/requirements.in

demo: install
	$(VENV)/bin/lora-scripts demo --output-dir demo_output

# the web console and API on the tiny model: open http://localhost:7860/login and sign in with the printed token
serve-demo: install
	$(VENV)/bin/lora-scripts serve --demo --home demo_output/service

# .ci/test-services installs (as root) and starts PostgreSQL, Chromium, Java and npm, and exports the test database's
# URL; without root it says what is missing and how to get it (those tests skip). CI (.ci/run) runs just this.
test: install
	eval "$$(bash .ci/test-services)" && $(MAKE) --no-print-directory tools && $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) $(TOOLS) demo_output output
