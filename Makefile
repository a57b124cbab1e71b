# The two commands of the quick start are `make run` and `make test`; both set up .venv first.
# `make run ARGS=...` passes other arguments to `swarm` (e.g. ARGS="run examples/huggingface-peft --compare").
VENV ?= .venv
PY := $(VENV)/bin/python
SWARM := $(VENV)/bin/swarm
ARGS ?= run examples/huggingface-peft
BENCH ?=

.PHONY: run test venv proto bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup-venv.sh
	bash scripts/setup-venv.sh $(VENV)

run: venv
	$(SWARM) $(ARGS)

test: venv
	bash scripts/run-tests.sh $(VENV)

proto: venv
	bash scripts/gen-proto.sh $(VENV)

bench: venv
	$(PY) -m bench $(BENCH)

clean:
	rm -rf $(VENV) .pytest_cache
