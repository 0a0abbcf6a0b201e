"""One module per bench suite; each defines `run(args) -> bench.report.SuiteResult`."""
