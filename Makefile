# Entry points: `make demo`, `make test` (fast) and `make test-all` (CI). All build the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch; an unpinned torch would pull several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
export VERSEMI_ROOT ?= $(CURDIR)/versemi_work

.PHONY: demo test test-all venv clean

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
	# a short CPU schedule with a small network; see README for the full-size command. Its 60 iterations
	# would train supervised throughout by default (--supervised-warm-up auto): the demo shows the method
	test -f "$(VERSEMI_ROOT)/results/DemoLA_DemoPancreas/VerSemiTrainer__3d_fullres/fold_0/checkpoint_final.pth" || \
	  $(BIN)/versemi_train 3d_fullres fold0 --epochs 4 --iterations-per-epoch 15 --val-iterations 5 \
	    --patch-size 32 48 48 --batch-size 2 --features 8 16 32 64 --optimizer adam --lr 3e-3 --num-workers 1 \
	    --supervised-warm-up 0
	@echo "training curves: $(VERSEMI_ROOT)/results/DemoLA_DemoPancreas/VerSemiTrainer__3d_fullres/fold_0/progress.png"
	$(BIN)/versemi_predict -i "$(VERSEMI_ROOT)/raw/DemoLA/imagesTs" -o "$(VERSEMI_ROOT)/predictions/DemoLA" -p DemoLA --overwrite
	$(BIN)/versemi_evaluate -r "$(VERSEMI_ROOT)/raw/DemoLA/labelsTs" -p "$(VERSEMI_ROOT)/predictions/DemoLA"
	$(BIN)/versemi_predict -i "$(VERSEMI_ROOT)/raw/DemoPancreas/imagesTs" -o "$(VERSEMI_ROOT)/predictions/DemoPancreas" -p DemoPancreas --overwrite
	$(BIN)/versemi_evaluate -r "$(VERSEMI_ROOT)/raw/DemoPancreas/labelsTs" -p "$(VERSEMI_ROOT)/predictions/DemoPancreas"
	# every structure of the experiment in one label map per case (values in labels.json), drawn per case
	$(BIN)/versemi_predict -i "$(VERSEMI_ROOT)/raw/DemoLA/imagesTs" -o "$(VERSEMI_ROOT)/predictions/all_structures" --overwrite --overlays
	@cat "$(VERSEMI_ROOT)/predictions/all_structures/labels.json"
	$(BIN)/versemi_export_bundle -p DemoLA -o "$(VERSEMI_ROOT)/bundles/demola_versemi" --overwrite
	$(BIN)/python -m monai.bundle run --config_file "$(VERSEMI_ROOT)/bundles/demola_versemi/configs/inference.json" \
	  --dataset_dir "$(VERSEMI_ROOT)/raw/DemoLA/imagesTs" --output_dir "$(VERSEMI_ROOT)/bundle_predictions/DemoLA"
	@echo "bundle output: $(VERSEMI_ROOT)/bundle_predictions/DemoLA"

# the fast suite (minutes); test-all adds the slow tests (training runs, subprocesses, end to end).
# OpenVINO's tests run in a process of their own, so that its runtime's thread pools never share a
# process with the other tests' training, forks and subprocesses.
test: venv
	$(BIN)/python -m pytest -q -m "not slow and not openvino" --durations=15
	$(BIN)/python -m pytest -q -m "openvino and not slow"

test-all: venv
	$(BIN)/python -m pytest -q -m "not openvino" --durations=30
	$(BIN)/python -m pytest -q -m openvino

clean:
	rm -rf "$(VERSEMI_ROOT)"
