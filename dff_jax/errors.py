"""The one error type users see, and the one CLI wrapper that turns it into an `error: ...` line.

Every problem a user can fix (a bad data file, a missing feature set, a config that cannot run, a run directory that
does not match) raises a subclass of `UserError` whose message names the file, line, record or field and says what
was expected. The command-line entry points run under `exit_on_user_error`, which prints that message as one line on
stderr and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem in what the user gave (data, features, config, run directory); the message says what and where."""


class ConfigError(UserError, ValueError):
    """A config value outside what the code accepts; the message names the field, the value and what is allowed."""


class TrainError(UserError):
    """A run that cannot start or go on (non-finite loss, missing features, a checkpoint that is not there)."""


def exit_on_user_error(main: Callable) -> Callable:
    """Wraps a CLI `main`: a `UserError` becomes `error: <message>` on stderr and exit status 2.

    It also quiets Orbax and absl, which log every checkpoint step at INFO: the commands print their own progress.
    """

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        from absl import logging

        logging.set_verbosity(logging.WARNING)
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapped
