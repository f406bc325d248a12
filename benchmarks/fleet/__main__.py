from benchmarks.fleet.runner import cli

raise SystemExit(cli())
