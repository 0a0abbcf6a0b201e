"""`python -m bench <suite> [options]`: run one bench suite, print its table, commit-ready results.

Each suite is a module `bench/suites/<name>.py` with `run(args) -> SuiteResult` and, optionally,
`add_arguments(parser)` for its own options.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

from bench import suites
from bench.report import RESULTS_DIR, command_line, write_results


def available_suites() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(suites.__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = available_suites()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in names:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown suite {argv[0]!r}; choose one of: {', '.join(names)}", file=sys.stderr)
        print("usage: python -m bench <suite> [options]   suites: " + ", ".join(names), file=sys.stderr)
        return 2 if argv and argv[0] not in ("-h", "--help") else 0
    module = importlib.import_module(f"bench.suites.{argv[0]}")
    parser = argparse.ArgumentParser(prog=f"python -m bench {argv[0]}", description=module.__doc__)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where <suite>.json/.md and summary.json go")
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    result = module.run(args)
    if result is None:  # a suite run on several ranks (torchrun): rank 0 writes the results
        return 0
    write_results(result, results_dir=args.results_dir, command=command_line(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
