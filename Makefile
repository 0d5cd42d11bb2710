# Two entry points: `make demo` and `make test`. Both build the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch; an unpinned torch would pull several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
export VERSEMI_ROOT ?= $(CURDIR)/versemi_work

.PHONY: demo test venv clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	test -d "$(VERSEMI_ROOT)/raw/DemoLA" || $(BIN)/versemi_make_synthetic -o "$(VERSEMI_ROOT)/raw"
	$(BIN)/versemi_plan_and_preprocess -d DemoLA DemoPancreas -np 2

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf "$(VERSEMI_ROOT)"
