"""The ``fusedlora`` command line: ``fusedlora {info,train,bench,plan}``."""

from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    from .info import report

    print(report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, GPU, whether the CUDA extension is built, the backend")
    p.set_defaults(func=_info)
    from .bench.suite import add_parser as add_bench

    add_bench(sub)
    from .train import add_subparser as add_train

    add_train(sub)
    from .plan import add_parser as add_plan

    add_plan(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
