# Two commands do all set-up on a fresh machine:  `make app`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: install app test test-fast bench demo-model clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

app: install  ## launch the app on the bundled demo model, on http://$(HOST):$(PORT)
	$(PY) app.py --host $(HOST) --port $(PORT)

test: install  ## the whole suite (CPU, a few minutes)
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow and not browser"

bench: install
	$(PY) bench/stats_overhead.py

demo-model: install  ## rebuild the corpus and retrain the demo model (about an hour on 2 CPU cores)
	$(PY) assets/build_corpus.py && $(PY) assets/train_demo.py && $(PY) assets/make_model_card.py

clean:
	rm -rf $(VENV) build .pytest_cache
