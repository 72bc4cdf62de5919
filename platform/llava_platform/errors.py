"""Exceptions that carry an actionable message for the user.

Every error a user can cause (a config typo, a bad URI, a model that does not fit together)
is raised as one of these, chained with ``raise ... from e`` to the library error beneath it,
so the first line the user reads says what to fix.
"""


class LlavaPlatformError(Exception):
    """Base class for errors caused by user input or environment."""


class ConfigError(LlavaPlatformError, ValueError):
    """A config file or override is unreadable, invalid, or names an unknown key."""


class StorageError(LlavaPlatformError):
    """A URI cannot be opened: unknown scheme, missing credentials, unreachable endpoint."""


class ModelBuildError(LlavaPlatformError, ValueError):
    """The requested model cannot be built or loaded (bad preset, mismatched components)."""


class TemplateError(LlavaPlatformError, ValueError):
    """An unknown conversation template, or a conversation the template cannot render."""


class RecordError(LlavaPlatformError, ValueError):
    """A dataset record is invalid. ``reason`` is a stable machine-readable code."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class TrackingError(LlavaPlatformError):
    """The MLflow tracking server cannot be reached."""
