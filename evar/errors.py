"""Errors a user can act on. The CLI prints their message as one line (no traceback) and exits 2."""


class EvarError(Exception):
    """Base of every error whose message is meant for the user."""


class CheckpointError(EvarError):
    """A checkpoint or model directory that cannot be loaded as asked (missing, corrupt, foreign, mis-shaped)."""


class ModelRefError(EvarError):
    """A model reference that names no model."""
