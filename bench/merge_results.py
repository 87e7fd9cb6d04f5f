"""Merges the results files of several bench scripts into one (DESIGN.md's schema) and prints its table.

    python bench/merge_results.py OUT/bench_*.json --out OUT/results.json
"""

import argparse
import os
import sys

from fusedlora.bench import report, results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows, env = [], None
    for path in args.files:
        if not os.path.exists(path):
            print(f"missing {path}", file=sys.stderr)
            continue
        doc = results.load(path)
        env = env or {k: v for k, v in doc.items() if k != "rows"}
        rows.extend(doc["rows"])
    if not rows:
        print("no rows", file=sys.stderr)
        return 1
    doc = results.save(rows, args.out, env)
    print(report.markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
