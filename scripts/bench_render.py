"""Re-render docs/benchmarks.md and its plots from the result JSONs already under bench/results/, without
running anything (e.g. after an interrupted suite, or a change to the renderer).

    python scripts/bench_render.py [--results bench/results] [--doc docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from longext.bench.run import write_doc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=Path("bench/results"))
    p.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    args = p.parse_args()
    print(f"benchmarks written to {write_doc(args.results, args.doc)}")


if __name__ == "__main__":
    main()
