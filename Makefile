# shardrec: `make demo` trains NCF on MovieLens-100K through Ray on 2 sharded ranks; `make test` runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= runs/data/ml-100k
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: venv venv-gpu gpu-check data demo test test-fast bench clean

venv: $(VENV)/.stack-installed

$(VENV)/.stack-installed: tools/install_stack.sh pyproject.toml
	bash tools/install_stack.sh $(VENV)
	touch $@

# CUDA machines: the same pins with FBGEMM's CUDA kernels, in .venv-gpu; then `make gpu-check`.
venv-gpu: .venv-gpu/.stack-installed

.venv-gpu/.stack-installed: tools/install_stack.sh pyproject.toml
	bash tools/install_stack.sh --cuda .venv-gpu
	touch $@

gpu-check:
	bash tools/gpu_check.sh $(if $(wildcard .venv-gpu/bin/python),.venv-gpu/bin/python,$(PY))

data: venv
	$(VENV)/bin/shardrec data prepare ml-100k --out $(DATA)

demo: data
	$(VENV)/bin/shardrec train --config launcher/configs/ncf_ml100k.toml --data.path $(DATA)

test: venv
	$(PY) -m pytest -ra --durations=25 tests

test-fast: venv
	$(PY) -m pytest -ra -m "unit or distributed" tests

clean:
	rm -rf runs .pytest_cache
