# minidit: `make demo` and `make test` each create the virtual environment (.venv) first when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
OUT    ?= out/demo
NBVAL  := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg
NB_DIRS := $(wildcard notebooks solutions)

# `make lab`: JupyterLab with the course's settings (jupyter/: no news prompt, no update check), the repository as its
# root, lesson 00 open; extra options in LAB_ARGS, e.g. `make lab LAB_ARGS="--no-browser --port 8900"`. It first
# trusts the course's notebooks (`jupyter trust`, signatures in the user's Jupyter data folder; the files are not
# changed), so their committed widgets and HTML animations render before the learner runs a cell.
LAB_ARGS ?=
LAB_ENV  := JUPYTER_CONFIG_PATH="$(CURDIR)/jupyter$${JUPYTER_CONFIG_PATH:+:$$JUPYTER_CONFIG_PATH}"
AS_ROOT  := $(if $(filter 0,$(shell id -u)),--allow-root)
COURSE_NBS := $(wildcard notebooks/*.ipynb exercises/*.ipynb solutions/*.ipynb)
CHROMIUM_PKGS := chromium chromium-driver
# Where browser-deps can install Chromium (root with apt, as in CI), a missing browser fails the browser tests
# instead of skipping them; MINIDIT_BROWSER_TESTS set by the caller wins.
BROWSER_TESTS := $(if $(and $(filter 0,$(shell id -u)),$(shell command -v apt-get)),required)

.PHONY: setup demo test lint unit notebooks-test notebooks exercises lab browser-deps lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)   ## train the flagship DiT on the bundled MNIST digits, sample, evaluate → $(OUT)/
	$(BIN)/minidit demo --out $(OUT)

test: $(STAMP) browser-deps   ## every test: lint, unit tests (JupyterLab in headless Chromium included), notebooks (nbval)
	$(BIN)/ruff check .
	MINIDIT_BROWSER_TESTS=$${MINIDIT_BROWSER_TESTS:-$(BROWSER_TESTS)} $(BIN)/python -m pytest -q -p no:cacheprovider tests
	$(BIN)/python -m pytest -q -p no:cacheprovider $(NBVAL) $(NB_DIRS)

lint: $(STAMP)
	$(BIN)/ruff check .

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests

notebooks-test: $(STAMP)
	$(BIN)/python -m pytest -q $(NBVAL) $(NB_DIRS)

notebooks: $(STAMP)   ## maintainers: re-execute and re-save every notebook (nbclient)
	$(BIN)/minidit notebooks notebooks solutions

exercises: $(STAMP)   ## regenerate exercises/ from solutions/
	$(BIN)/minidit exercises

lab: $(STAMP)   ## open the course in JupyterLab at lesson 00, with this environment as the kernel
	$(LAB_ENV) $(BIN)/jupyter trust $(COURSE_NBS) >/dev/null
	$(LAB_ENV) $(BIN)/jupyter lab --ServerApp.root_dir="$(CURDIR)" $(AS_ROOT) $(LAB_ARGS) notebooks/00_welcome.ipynb

browser-deps:   ## tests/test_browser.py's browser: Debian's chromium + chromium-driver, installed with apt when root
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's $(CHROMIUM_PKGS) (apt-get) for tests/test_browser.py"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq $(CHROMIUM_PKGS) >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq $(CHROMIUM_PKGS) >/dev/null; }; \
	else echo "note: no chromium/chromedriver (as root: apt-get install $(CHROMIUM_PKGS)); tests/test_browser.py skips"; fi

lock:   ## maintainers: re-pin the tested set after changing dependencies
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^minidit' > requirements/constraints.txt

clean:
	rm -rf $(VENV) out
