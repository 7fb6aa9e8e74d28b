"""The command line: a thin layer over the public API, and the only place that prints and exits.

``parser.py`` reads the command line, ``commands.py`` and ``result_commands.py`` call the
library, ``output.py`` prints; this module is the one error boundary (exit codes, one line,
``--debug``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from lrsearch.cli.commands import EXIT_OK
from lrsearch.cli.parser import build_parser
from lrsearch.core.errors import ERROR_PREFIX, LrsearchError, first_line
from lrsearch.service.launch import tell_parent

EXIT_RUNTIME, EXIT_INTERRUPTED = 1, 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a program killed by the closed pipe would exit


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code (0 ok, 1 runtime failure, 2 bad input, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "debug", False):
        os.environ["LRSEARCH_DEBUG"] = "1"  # the tracking process's stderr too (track/process.py)
    try:
        from lrsearch.store.heartbeat import check_settings

        check_settings()  # read deep inside opening a store: checked before anything is made
        return args.command(args) or EXIT_OK
    except BrokenPipeError:  # `lrsearch sql … | head`: the reader has all it wanted
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except LrsearchError as e:  # UsageError: 2, Interrupted: 128 + signal, others: 1
        return _fail(args, e, e.exit_code, str(e))
    except KeyboardInterrupt as e:
        return _fail(args, e, EXIT_INTERRUPTED, "interrupted")
    except Exception as e:  # anything unforeseen: still one line, --debug for the traceback
        return _fail(args, e, EXIT_RUNTIME, f"{type(e).__name__}: {first_line(e)}")


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush meets no closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _fail(args: argparse.Namespace, e: BaseException, code: int, message: str) -> int:
    if getattr(args, "debug", False):
        raise e
    print(f"{ERROR_PREFIX}{message}", file=sys.stderr)
    tell_parent("error", message)  # a worker process that `run` started: to that process
    return code


def entry() -> None:
    """The ``lrsearch`` executable: :func:`main`, then a quick exit.

    A process that imported torch, Lightning and MLflow spends seconds tearing the
    interpreter down (module and object finalization) after everything is written, closed
    and drained; a command that trained skips that with ``os._exit`` once its output is
    flushed. Imported as a library, :func:`main` returns normally.
    """
    code = main()
    if "lrsearch.track.process" in sys.modules:  # its tracking processes finish their work first
        from lrsearch.track.process import close_all

        close_all()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        code = EXIT_BROKEN_PIPE
    if "torch" in sys.modules:
        import logging

        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
