"""``fusedlora train`` / ``python -m fusedlora.train``: the command line over TrainConfig and the loop."""

from __future__ import annotations

import argparse
import os
import sys

from .config import TrainConfig, add_arguments, given_fields, resolve

HELP = "LoRA / QLoRA fine-tuning of a local Hugging Face causal LM, or of the built-in tiny model on CPU"


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Add ``train`` to the ``fusedlora`` command's subparsers."""
    p = subparsers.add_parser("train", help=HELP, description=HELP)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict | None]:
    """(config, saved state to resume from or None). Nothing is written; every conflict is an error."""
    from . import checkpoint

    given = given_fields(args)
    out = given.get("out", TrainConfig.out)
    if given.get("resume"):
        state = checkpoint.require_latest(out)
        return resolve(given, state["config"]), state
    existing = checkpoint.latest(out)
    if existing is not None:
        raise FileExistsError(f"--out: {out} already holds a run (checkpoint at step {existing.get('step')}); "
                              "pass --resume to continue it, or choose another --out")
    return resolve(given, None), None


def run(args: argparse.Namespace) -> int:
    try:
        config, state = config_from_args(args)
        from .loop import train

        summary = train(config, saved_state=state)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"fusedlora train: error: {exc}", file=sys.stderr)
        return 2
    if summary.get("loss_first") is not None and os.environ.get("RANK", "0") == "0":
        speed = f"{summary['tokens_per_s']:,.0f} tokens/s, " if summary.get("tokens_per_s") else ""
        print(f"loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f}, {speed}"
              f"backend {summary['backend']}; outputs in {config.out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedlora.train", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))
