"""The one error type users see, and the one CLI wrapper that turns it into an `error: ...` line.

Every problem a user can fix (a bad data file, a missing feature set, a config that cannot run, a run directory that
does not match) raises a subclass of `UserError` whose message names the file, line, record or field and says what
was expected. The command-line entry points run under `exit_on_user_error`, which prints that message as one line on
stderr and exits with status 2. So does an operating-system error (disk full, a read-only or missing folder, no
permission), also when a library wrapped it in an exception of its own: `error: <path>: <what>`. Every file is
written to a temporary name and renamed (records.write_json_atomic, Orbax checkpoints), so such a stop leaves
nothing half-written and a rerun after the cause is fixed resumes. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem in what the user gave (data, features, config, run directory); the message says what and where."""


class ConfigError(UserError, ValueError):
    """A config value outside what the code accepts; the message names the field, the value and what is allowed."""


class TrainError(UserError):
    """A run that cannot start or go on (non-finite loss, missing features, a checkpoint that is not there)."""


class WriteError(TrainError):
    """The operating system refused a write (disk full, quota, read-only, permission) where a library reports it
    in an error of its own (Orbax's asynchronous checkpoint writers)."""


# The operating-system failures a write can meet, as libraries spell them in their messages.
WRITE_FAILURES = (
    "No space left on device",
    "Disk quota exceeded",
    "File too large",
    "Read-only file system",
    "Permission denied",
)


def write_failure_in(error: BaseException) -> str | None:
    """Which of WRITE_FAILURES the messages of `error` and its causes name, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = f"{error} {getattr(error, 'strerror', '') or ''}"
        found = next((f for f in WRITE_FAILURES if f.lower() in text.lower()), None)
        if found:
            return found
        error = error.__cause__ or error.__context__
    return None


def exit_on_user_error(main: Callable) -> Callable:
    """Wraps a CLI `main`: a `UserError` becomes `error: <message>` on stderr and exit status 2.

    It also quiets Orbax and absl, which log every checkpoint step at INFO and the failures of their writer threads
    with whole tracebacks (those failures reach the main thread as exceptions, which end here): the commands print
    their own progress and errors. Python's asyncio logger, which Orbax's writers trip when they fail, likewise.
    """

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        import logging as python_logging

        from absl import logging

        logging.set_verbosity(logging.FATAL)
        python_logging.getLogger("asyncio").setLevel(python_logging.CRITICAL)
        sys.unraisablehook = _quiet_closed_loops
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            # Checkpoints are atomic and a run resumes from the last complete one: say so, without a traceback.
            _exit_now("interrupted: the same command resumes from the last complete checkpoint", status=130)
        except WriteError as e:
            _exit_now(f"error: {e}")
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        except MemoryError as e:  # numpy's "Unable to allocate 36.4 TiB for an array ..." of an absurd size
            _exit_now(
                f"error: out of memory: {one_line(str(e)) or 'an allocation failed'}; check the config's sizes "
                "(train.batch_size, eval.batch_size, data.max_seq_len, model.embed_dim, eval.chunk_size)"
            )
        except Exception as e:
            cause = os_error_in(e)
            if cause is None:
                raise
            _exit_now(f"error: {cause.filename or 'dff_jax'}: {cause.strerror or cause}")

    return wrapped


def _quiet_closed_loops(unraisable) -> None:
    """sys.unraisablehook without the "Event loop is closed" tracebacks that TensorStore's callbacks report (as
    unraisable exceptions) when a failed Orbax write has already torn down its event loop; anything else as usual."""
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def _exit_now(message: str, status: int = 2) -> None:
    """Prints the error and exits with status 2 at once: after a failed write, background checkpoint writers would
    otherwise keep failing while the interpreter shuts down and bury the one line under hundreds. Nothing is lost:
    every file is written to a temporary name and renamed, so what exists is whole."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(status)


def os_error_in(error: BaseException | None) -> OSError | None:
    """The OSError behind `error`, following its causes and contexts (Orbax and jax wrap the ones they hit)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and not isinstance(error, (TimeoutError, ConnectionError)):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def folder_arg(value: str | None, flag: str) -> str:
    """The value of a folder flag (--workdir, --out), refused when empty: "" (an unset "$W") would mean the current
    folder, where a run writes its files and --restart deletes them."""
    if value is None or not str(value).strip():
        raise UserError(f"{flag} is empty; expected a folder")
    return value


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error: ...` line and exit status 2, like every other user error (not
    argparse's usage dump)."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_flags(argv: list[str], flag_values=None) -> list[str]:
    """absl flag parsing (`app.run(main, flags_parser=parse_flags)`) that turns a bad flag, a config typo or a bad
    variant into one `error:` line and exit status 2, like every other user error, instead of absl's usage dump."""
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    try:
        rest = flag_values(argv)
        if "config" in flag_values and flag_values.config is not None:
            # A config file that failed to load is an error object that raises on first use: use it here.
            loaded = flag_values.config
            if isinstance(loaded, (int, float, str, bytes, list, tuple)):  # a file whose get_config is wrong
                print(
                    f"error: {_config_file(argv)}: get_config() returned {type(loaded).__name__} {loaded!r:.40}; "
                    "expected an ml_collections.ConfigDict",
                    file=sys.stderr,
                )
                sys.exit(2)
            loaded.keys()
        if len(rest) > 1:  # absl leaves them to main, which takes none: `--history a b` would use only `a`
            shown = " ".join(repr(a) for a in rest[1:4]) + (" ..." if len(rest) > 4 else "")
            print(
                f"error: unexpected argument(s) {shown}: every flag takes one value (quote a value with spaces, "
                'e.g. --history "a b c"; config overrides are --config.field=value)',
                file=sys.stderr,
            )
            sys.exit(2)
        return rest
    except flags.Error as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
    except Exception as e:  # a typo, a bad value, or a config file that does not load (SyntaxError, NameError, ...)
        bad = [a for a in argv[1:] if a.startswith("--config")]
        if isinstance(e, AttributeError) and "get_config" in str(e):  # the file loaded but is not a config file
            print(f"error: {_config_file(argv)}: defines no get_config(variant)", file=sys.stderr)
            sys.exit(2)
        if isinstance(e, (KeyError, AttributeError)):  # ml-collections names only the missing key: "'lr'"
            what = "no such config field "
        elif isinstance(e, (SyntaxError, NameError, ImportError)):
            what = f"{type(e).__name__}: "
        else:
            what = ""
        print(f"error: bad --config argument ({' '.join(bad)}): {what}{one_line(str(e))}", file=sys.stderr)
    sys.exit(2)


def overridden_fields(argv: list[str]) -> list[str]:
    """The config paths `--config.a.b=v` (or `--config.a.b v`) of `argv` overrides: ["a.b", ...]."""
    return [a.split("=")[0].removeprefix("--config.") for a in argv if a.startswith("--config.")]


def _config_file(argv: list[str]) -> str:
    """The file of `--config FILE[:variant]` (or `--config=FILE...`) in `argv`, without the variant."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":")[0]
        if arg.startswith("--config="):
            return arg.removeprefix("--config=").split(":")[0]
    return "--config"


def one_line(text: str) -> str:
    """A message as one line: the last line of an embedded traceback (the error itself), else all of it joined."""
    text = text.strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # a repr'd message (KeyError's): unquote it
        text = text[1:-1].replace("\\'", "'")
    text = text.replace("\\n", "\n")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        return f"{lines[0]} {lines[-1]}"
    return " ".join(lines)
