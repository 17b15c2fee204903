"""The `qbara` command line. Errors in the input print one line and exit with code 2; Ctrl-C prints one line
(`qbara VERB: interrupted`, with what to do next where there is something) and exits with 130."""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys

import qbara
from qbara.commands import demo, eval, export, generate, gguf, lq, merge, quantize, train
from qbara.errors import QbaraError

__all__ = ["main"]


def _version() -> str:
    """The installed package's version, else the source tree's `qbara.__version__`."""
    try:
        return importlib.metadata.version("qbara")
    except importlib.metadata.PackageNotFoundError:
        return qbara.__version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qbara", description="Fine-tune quantized LLMs and ship them low-bit.")
    parser.add_argument("--version", action="version", version=f"qbara {_version()}", help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                       help="one of the commands below; `qbara COMMAND --help` lists its options")
    for module in (demo, train, eval, generate, merge, export, gguf, quantize, lq):
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "eval_tokens", None) == 0:
        args.eval_tokens = None
    try:
        if getattr(args, "accepts_extra", False):
            args.func(args, extra)
        else:
            args.func(args)
    except KeyboardInterrupt as err:  # Ctrl-C: one line, the shell's exit code for SIGINT
        message = " ".join(str(err).split()) or "interrupted"
        print(f"qbara {args.command}: {message}", file=sys.stderr)
        return 130
    except QbaraError as err:
        print(f"qbara {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except OSError as err:  # a file that vanished, a full disk, a read-only or size-limited filesystem
        where = f"{err.filename}: " if err.filename else ""
        print(f"qbara {args.command}: error: {where}{err.strerror or err}; check the path, the free space and "
              f"the permissions, then run again", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
