"""How every stage reports bad input: one line on stderr, exit code 2, no traceback."""
import errno
import sys

FULL = (errno.ENOSPC, errno.EDQUOT)


class UserError(Exception):
    """A problem the user can fix (bad file, field or parameter). Message is one line."""


def run_main(main, argv=None):
    """Run a stage's main(); turn UserError into a one-line message and exit code 2."""
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in FULL:
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(f"error: no space left on the device{where} ({err.strerror}); free some space and re-run "
              "(outputs are written whole or not at all)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
