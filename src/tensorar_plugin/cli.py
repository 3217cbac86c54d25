"""The `tensorar` console script: one subcommand per module in `tensorar_plugin.commands`.

Each command module defines `register(subparsers)`, which adds its parser and sets `func` (called with
the parsed namespace, returning an exit code). A command reports a mistake in its input by raising one of
`USER_ERRORS` (a `ValueError` naming the flag, say); `main` prints it as a `tensorar CMD: error:` line (and
a hint on seeing the traceback) and exits with code 2, like argparse does for a malformed command line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator

from . import __version__

#: exceptions that report a mistake in the command's input (a path, a value): one `error:` line, exit code 2
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError)

#: command modules, in the order `tensorar --help` lists them
COMMAND_MODULES = (
    "tensorar_plugin.commands.sample",
    "tensorar_plugin.commands.tokenize",
    "tensorar_plugin.commands.finetune",
    "tensorar_plugin.commands.sample_npz",
    "tensorar_plugin.commands.fid",
)


def error_message(error: BaseException) -> str:
    """The message of a user error, without the wrapping a DataLoader worker adds ("Caught ValueError in
    DataLoader worker process 0. Original Traceback ...": the original message is its last line)."""
    text = str(error)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        prefix = f"{type(error).__name__}: "
        return last[len(prefix):] if last.startswith(prefix) else last
    return text


@contextlib.contextmanager
def about_flag(flag: str, value: object = None) -> Iterator[None]:
    """User errors raised inside name the flag they came from: `FLAG VALUE: message` (`FLAG: message` when the
    message names the value, nothing added when it starts with the flag), so a message from library code
    says which part of the command line to fix."""
    try:
        yield
    except USER_ERRORS as error:
        text = error_message(error)
        if text.startswith(flag):
            raise
        prefix = flag if value is None or str(value) in text else f"{flag} {value}"
        # the same kind of error again, or the listed kind it derives from: JSONDecodeError, say, cannot be
        # rebuilt from a message alone
        kind = next(k for k in (type(error), *USER_ERRORS) if k in USER_ERRORS and isinstance(error, k))
        raise kind(f"{prefix}: {text}") from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tensorar", description="TensorAR: next-tensor prediction for "
                                     "autoregressive image generation.")
    parser.add_argument("--version", action="version", version=f"tensorar-plugin {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:  # a command ships with the module that implements it
            importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as error:
        if os.environ.get("TENSORAR_TRACEBACK"):
            raise
        print(f"tensorar {args.command}: error: {error_message(error)}\n(set TENSORAR_TRACEBACK=1 to see where it "
              f"was raised)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
