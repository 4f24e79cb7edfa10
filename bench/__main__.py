"""``python -m bench [SCENARIO|all] [options]``: run benchmarks, or list them.

Run from the repository root with the project's virtualenv, e.g.
``.venv/bin/python -m bench get``. Each scenario starts its own Redis,
PostgreSQL, cachecoord and echo floor, and ends with ``RESULT name=value`` lines.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

from bench import plot
from bench.harness import Options
from bench.scenarios import SCENARIOS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("scenario", nargs="?", help=f"one of {', '.join(SCENARIOS)}, all, or plot")
    Options.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.scenario is None:
        print("scenarios (python -m bench NAME [--quick] [--runs N]):")
        for name, scenario in SCENARIOS.items():
            cluster = " [--cluster]" if scenario.cluster else ""
            print(f"  {name:<8} {scenario.summary}{cluster}")
        print(f"  {'all':<8} every scenario, one after the other, then plot")
        print(f"  {'plot':<8} draw the saved figures of every scenario (docs/benchmarks.png)")
        return 0
    on_cluster = [name for name, scenario in SCENARIOS.items() if scenario.cluster]
    if args.cluster and args.scenario not in on_cluster:
        parser.error(
            f"--cluster: only {' and '.join(on_cluster)} run on a Redis Cluster; "
            f"run them one by one (not {args.scenario!r})"
        )
    if args.scenario == "plot":
        plot.run(Options.from_args(args))
        return 0
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; choose one of {', '.join(SCENARIOS)}, all")
    options = Options.from_args(args)
    if args.scenario != "all":
        _run(names[0], options)
        return 0
    # Every scenario, even after one failed: one broken scenario must not hide the
    # figures of the others. The exit code still says something failed.
    everything = time.monotonic()
    failed = []
    for name in names:
        try:
            _run(name, options)
        except Exception:
            traceback.print_exc()
            print(f"(bench {name} FAILED; going on with the next scenario)", flush=True)
            failed.append(name)
    if options.results is not None:
        plot.run(options)
    print(f"(bench all took {time.monotonic() - everything:.0f} s)", flush=True)
    if failed:
        print(f"bench all: {len(failed)} scenario(s) failed: {', '.join(failed)}", flush=True)
        return 1
    return 0


def _run(name: str, options: Options) -> None:
    started = time.monotonic()
    quick = " (--quick: a smoke run, too short for its figures to mean much)"
    cluster = " on a Redis Cluster (--cluster)"
    print(
        f"== bench {name}{cluster if options.cluster else ''}{quick if options.quick else ''} ==",
        flush=True,
    )
    SCENARIOS[name].run(options)
    print(f"(bench {name} took {time.monotonic() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
