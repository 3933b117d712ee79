"""Errors a user can act on. The CLI prints their message as one line (no traceback) and exits 2."""


class EvarError(Exception):
    """Base of every error whose message is meant for the user."""


class CheckpointError(EvarError):
    """A checkpoint or model directory that cannot be loaded as asked (missing, corrupt, foreign, mis-shaped)."""


class ModelRefError(EvarError):
    """A model reference that names no model."""


def run_cli(app) -> None:  # app: a typer.Typer (not imported here: this module stays dependency-free)
    """Run a command-line app the EVAR way: an EvarError is one line on stderr and exit code 2."""
    import errno
    import sys

    try:
        app()
    except EvarError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # outputs are written to temp names and renamed into place, so the half-written part is already gone
        print(f"error: the disk is full (writing {err.filename or 'an output'}); nothing half-written was kept: "
              "free some space and run the same command again", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
