.PHONY: bench bench-smoke fleet

# The performance suite, side by side in one run; writes benchmarks/RESULTS.md (a few minutes).
bench:
	.venv/bin/python -m benchmarks

# A few seconds per benchmark, figures not meaningful: checks that the suite still runs.
bench-smoke:
	.venv/bin/python -m benchmarks --quick

fleet: ; .venv/bin/python -m benchmarks.fleet
