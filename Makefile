# shardrec: `make demo` trains NCF on MovieLens-100K through Ray on 2 sharded ranks; `make test` runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= runs/data/ml-100k
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: venv data demo test test-fast bench clean

venv: $(VENV)/.stack-installed

$(VENV)/.stack-installed: tools/install_stack.sh pyproject.toml
	bash tools/install_stack.sh $(VENV)
	touch $@

data: venv
	$(VENV)/bin/shardrec data prepare ml-100k --out $(DATA)

demo: data
	$(VENV)/bin/shardrec train --config launcher/configs/ncf_ml100k.toml --data.path $(DATA)

test: venv
	$(PY) -m pytest -ra tests

test-fast: venv
	$(PY) -m pytest -ra -m "unit or distributed" tests

clean:
	rm -rf runs .pytest_cache
