# Developer shortcuts for bids_ctp. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: venv test demo container-test clean distclean

venv: $(STAMP)

# Re-install when the package metadata changes; the stamp keeps it from being redone every time.
$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $@

test: venv
	$(VENV)/bin/python -m pytest -q -n 2 tests

demo: venv
	test -d demo/bids || $(VENV)/bin/bids_ctp-phantom demo/bids --seed 1
	$(VENV)/bin/bids_ctp demo/bids demo/derivatives participant -w demo/work
	@echo "Accuracy against the phantom's ground truth (median per region):"
	$(VENV)/bin/python benchmarks/compare_truth.py demo/bids demo/derivatives
	@echo "Input dataset:  $(CURDIR)/demo/bids"
	@echo "Ground truth:   $(CURDIR)/demo/bids/derivatives/groundtruth"
	@echo "Derivatives:    $(CURDIR)/demo/derivatives"

# Build the Docker image and run the phantom demo in it (read-only input, non-root uid); slow
# (about 2-3 min), so not part of `make test`. See scripts/container-test.sh for its settings.
container-test:
	scripts/container-test.sh

clean:
	rm -rf demo build dist .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
