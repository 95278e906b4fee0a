"""Re-render docs/benchmarks.md and its plots from the result JSONs already under bench-runs/,
without running anything (e.g. after an interrupted suite, or a change to the renderer).

    python scripts/bench_render.py [--out bench-runs] [--doc docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from longext.bench.run import write_doc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench-runs"))
    p.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    args = p.parse_args()
    print(f"benchmarks written to {write_doc(args.out, args.doc)}")


if __name__ == "__main__":
    main()
