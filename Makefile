# The two commands of the README. Each runs the idempotent set-up first.
.PHONY: setup demo test
setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/pdpush demo

test: setup
	.venv/bin/python -m pytest
