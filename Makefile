# The two commands of the quick start are `make run` and `make test`; both set up .venv first.
# `make run ARGS=...` passes other arguments to `swarm` (e.g. ARGS="run examples/huggingface-peft --compare").
VENV ?= .venv
PY := $(VENV)/bin/python
SWARM := $(VENV)/bin/swarm
ARGS ?= run examples/huggingface-peft
BENCH ?=
PYTEST_ARGS ?=

.PHONY: run test test-fast venv system proto bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup-venv.sh
	bash scripts/setup-venv.sh $(VENV)

run: venv
	$(SWARM) $(ARGS)

# System packages pip cannot install (etcd for the replicated ledger store's tests); `make run` needs none.
system:
	bash scripts/setup-system.sh

test: venv system
	bash scripts/run-tests.sh $(VENV) $(PYTEST_ARGS)

# Everything not marked slow: under 3 minutes on 2 cores, for quick feedback while working.
test-fast: venv system
	bash scripts/run-tests.sh $(VENV) -m "not slow" $(PYTEST_ARGS)

proto: venv
	bash scripts/gen-proto.sh $(VENV)

bench: venv
	$(PY) -m bench $(BENCH)

clean:
	rm -rf $(VENV) .pytest_cache
