# The two commands of the quick start are `make run` and `make test`; both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
SWARM := $(VENV)/bin/swarm
ARGS ?= --help

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
	$(PY) -m bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
