"""``fusedlora train`` / ``python -m fusedlora.train``: the command line over TrainConfig and the loop."""

from __future__ import annotations

import argparse
import os
import sys

from .config import TrainConfig, add_arguments, default_out, given_fields, resolve
from .outdir import WRITE_ERRORS

HELP = "LoRA / QLoRA fine-tuning of a local Hugging Face causal LM, or of the built-in tiny model on CPU"


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Add ``train`` to the ``fusedlora`` command's subparsers."""
    p = subparsers.add_parser("train", help=HELP, description=HELP)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict | None]:
    """(config, saved state to resume from or None). Nothing is written; every conflict is an error."""
    from . import checkpoint, outdir

    given = given_fields(args)
    out = given.get("out") or default_out(given.get("model"))
    given["out"] = out
    if given.get("resume"):
        state = checkpoint.require_latest(out)
        return resolve(given, state["config"]), state
    outdir.check(out)
    existing = checkpoint.latest(out)
    if existing is not None:
        raise FileExistsError(f"--out: {out} already holds a run (checkpoint at step {existing.get('step')}); "
                              "pass --resume to continue it, or choose another --out")
    return resolve(given, None), None


def _error(message: str) -> int:
    print(f"fusedlora train: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """The command: train, report, and leave the process group a multi-process launch joined (a process that
    exits inside one can abort in its communication threads, and its peers with it)."""
    try:
        code = _run(args)
    except BaseException:
        _leave_process_group(wait_for_peers=False)  # the peers may never get to the end
        raise
    _leave_process_group(wait_for_peers=code == 0)  # a process that failed leaves at once, as on a raise
    return code


def _leave_process_group(wait_for_peers: bool) -> None:
    """Destroy the process group, after every process got to the end when ``wait_for_peers``: rank 0 still
    writes its summary and plot when the others are done, and a process tearing its group down while a peer
    is still connected was seen to abort (SIGABRT in gloo's threads at exit)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait_for_peers:
        try:
            dist.barrier()
        except RuntimeError:  # a peer left without getting here: nothing to wait for
            pass
    dist.destroy_process_group()


def _run(args: argparse.Namespace) -> int:
    from .stop import Interrupted

    try:
        config, state = config_from_args(args)
        from .loop import train

        summary = train(config, saved_state=state)
    except Interrupted as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"fusedlora train: {exc}", file=sys.stderr)
        return exc.exit_code
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as exc:
        return _error(str(exc))
    except OSError as exc:
        if exc.errno not in WRITE_ERRORS:
            raise
        return _error(f"cannot write {exc.filename or 'the output folder'}: {exc.strerror}")
    if summary.get("loss_first") is not None and os.environ.get("RANK", "0") == "0":
        speed = f"{summary['tokens_per_s']:,.0f} tokens/s, " if summary.get("tokens_per_s") else ""
        print(f"loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f}, {speed}"
              f"backend {summary['backend']}; outputs in {config.out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedlora.train", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))
