"""`make bench`: run every benchmark (or those named: python -m bench engine_bench ...)."""

from __future__ import annotations

import importlib
import sys

MODULES = ["burst_bench", "host_cost", "arrivals_bench", "prep_bench", "engine_bench",
           "stream_bench", "quant_memory", "gateway_bench"]


def main(argv: list[str]) -> int:
    for name in argv or MODULES:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as error:
            print(f"bench: skipping {name}: {error}", file=sys.stderr)
            continue
        module.main()
    return 0


raise SystemExit(main(sys.argv[1:]))
