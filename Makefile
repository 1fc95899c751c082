# The two commands of this repo (see README):
#   make demo   set up everything, start the dev ComfyUI headless, run the main job through its API
#   make test   set up everything, run the whole test suite
PY := .venv/bin/python

.PHONY: setup test test-fast demo lint clean-env

setup:
	bash scripts/setup.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# only the tiers that need no running ComfyUI server or browser
test-fast: setup
	$(PY) -m pytest -m "trainers or nodes" $(PYTEST_ARGS)

demo: setup
	$(PY) scripts/demo.py $(DEMO_ARGS)

lint: setup
	$(PY) -m ruff check .

clean-env:
	rm -rf .venv .comfyui .cache
