# minidit: `make demo` and `make test` each create the virtual environment (.venv) first when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
OUT    ?= out/demo
NBVAL  := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg
NB_DIRS := $(wildcard notebooks solutions)

.PHONY: setup demo test lint unit notebooks-test notebooks exercises lab lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)   ## train the flagship DiT on the bundled MNIST digits, sample, evaluate → $(OUT)/
	$(BIN)/minidit demo --out $(OUT)

test: $(STAMP)   ## every test: lint, unit tests, notebooks (nbval)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider tests
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

lab: $(STAMP)   ## open the course in JupyterLab with this environment as the kernel
	$(BIN)/jupyter lab notebooks

lock:   ## maintainers: re-pin the tested set after changing dependencies
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^minidit' > requirements/constraints.txt

clean:
	rm -rf $(VENV) out
