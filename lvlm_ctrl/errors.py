"""User-facing errors: one line naming the problem and the fix, and a non-zero exit."""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Bad input from the user; the message says what is wrong and how to fix it."""


def _user_error(err: BaseException | None) -> UserError | None:
    # hydra.utils.instantiate wraps what a target raises; the UserError sits in the cause chain.
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def cli(main):
    """Wrap an entry point's body so a UserError prints one line and exits 2 (inside @hydra.main)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as err:
            user = _user_error(err)
            if user is None:
                raise
            print(f"error: {user}", file=sys.stderr)
            sys.exit(2)

    return wrapper
