"""``python -m bench [SCENARIO|all] [options]``: run benchmarks, or list them.

Run from the repository root with the project's virtualenv, e.g.
``.venv/bin/python -m bench get``. Each scenario starts its own Redis,
PostgreSQL, cachecoord and echo floor, and ends with ``RESULT name=value`` lines.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench.harness import Options
from bench.scenarios import SCENARIOS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("scenario", nargs="?", help=f"one of {', '.join(SCENARIOS)}, or all")
    Options.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.scenario is None:
        print("scenarios (python -m bench NAME [--quick] [--runs N]):")
        for name, scenario in SCENARIOS.items():
            print(f"  {name:<8} {scenario.summary}")
        print(f"  {'all':<8} every scenario, one after the other")
        return 0
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; choose one of {', '.join(SCENARIOS)}, all")
    options = Options.from_args(args)
    for name in names:
        started = time.monotonic()
        quick = " (--quick: a smoke run, too short for its figures to mean much)"
        print(f"== bench {name}{quick if options.quick else ''} ==", flush=True)
        SCENARIOS[name].run(options)
        print(f"(bench {name} took {time.monotonic() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
