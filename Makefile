# `make demo` and `make test` are all a fresh machine needs: both install first.
SHELL := /bin/bash
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp
ARCH := $(shell uname -m)
# torch wheels that match this platform (see README "Installing")
ifeq ($(ARCH),x86_64)
TORCH := torch==2.14.1 torchvision==0.29.1
else
TORCH := torch==2.9.1 torchvision==0.24.1
endif
DEMO_DIR := build/demo
WILLOW := $(abspath ../shared/data/pf-willow)
WITH_WILLOW := --set 'datasets=[synthetic, pfwillow]' --set download.pfwillow.source=$(WILLOW)
DEMO_SETS := $(if $(wildcard $(WILLOW)/test_pairs.csv),$(WITH_WILLOW))
PLOTS_TEMPLATE := .dvc/offline_plots.html
export PATH := $(BIN):$(PATH)

.PHONY: install test demo bench clean

install: $(STAMP) $(PLOTS_TEMPLATE)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# `dvc plots show` without a network (.dvc/config: plots.html_template)
$(PLOTS_TEMPLATE): $(STAMP)
	$(BIN)/python -c "from semcorr.pipeline.plots import write_offline_template as w; w('$@')"

test: install
	$(BIN)/pytest -q

demo: install
	$(BIN)/semcorr workspace $(DEMO_DIR) --params configs/demo.yaml $(DEMO_SETS)
	cd $(DEMO_DIR) && dvc repro
	@# commit the results: the baseline that `dvc exp show` / `dvc metrics diff` compare against
	cd $(DEMO_DIR) && git add dvc.lock && git add -A data results && (git diff --cached --quiet || git commit -qm "demo results")
	@cat $(DEMO_DIR)/results/summary.md

bench: install
	$(BIN)/python benchmarks/cli_startup.py
	$(BIN)/python benchmarks/extract_throughput.py
	$(BIN)/python benchmarks/finetune_step.py
	$(BIN)/python benchmarks/eval_throughput.py
	$(BIN)/python benchmarks/cost_model.py
	$(BIN)/python benchmarks/propagation.py

clean:
	rm -rf $(DEMO_DIR)
