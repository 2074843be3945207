# Two entry points from a fresh clone: `make demo` and `make test`.
# Both create ./.venv on first use (Python >= 3.11 as `python3`, or set PYTHON=...).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean

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

lint: $(BIN)/.installed
	$(BIN)/ruff check sipp_onnx tests tools
	$(BIN)/mypy sipp_onnx

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
