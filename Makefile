# Every target sets up .venv first: a missing or stale environment (pyproject.toml or
# constraints.txt newer than the last install, or a venv made by another Python) is rebuilt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= runs/demo

.PHONY: venv test demo bench pictures constraints clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "imgrec needs Python >= 3.11; run make PYTHON=python3.11"'
	@if [ -x $(PY) ] && ! $(PY) -c 'import sys' >/dev/null 2>&1; then echo "rebuilding broken $(VENV)"; rm -rf $(VENV); fi
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,bench]'
	@touch $(STAMP)

test: venv
	$(PY) -m pytest -q

# The demo end to end: synthetic dataset (cached) -> train -> evaluate -> predict -> HTML report.
demo: venv
	$(VENV)/bin/imgrec demo --out $(DEMO)

bench: demo  # eval_parity.py measures the demo model
	$(PY) benchmarks/synth_difficulty.py
	$(PY) benchmarks/train_throughput.py --accuracy
	$(PY) benchmarks/loader_throughput.py
	$(PY) benchmarks/eval_parity.py
	$(PY) benchmarks/shards_vs_folder.py
	$(PY) benchmarks/ssl_transfer.py
	$(PY) benchmarks/ddp_scaling.py --gpu
	$(PY) benchmarks/serve_load.py --run $(DEMO)
	$(PY) benchmarks/cli_startup.py
	$(PY) benchmarks/epoch_overheads.py
	$(PY) benchmarks/time_to_accuracy.py $(if $(TIMM_TRAIN),--timm-train $(TIMM_TRAIN))  # TIMM_TRAIN=path/to/timm/train.py adds timm's column

pictures: demo  # README's picture of the demo's report (headless Chromium)
	$(PY) docs/report_picture.py --run $(DEMO)

constraints: venv
	{ head -n 2 constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v -e "^imgrec" -e "^ruff=="; } > constraints.new && mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info
