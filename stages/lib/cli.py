"""How every stage reports bad input: one line on stderr, exit code 2, no traceback."""
import sys


class UserError(Exception):
    """A problem the user can fix (bad file, field or parameter). Message is one line."""


def run_main(main, argv=None):
    """Run a stage's main(); turn UserError into a one-line message and exit code 2."""
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
