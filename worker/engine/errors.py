"""The engine's exceptions.

Every ``EngineError`` is bad input the caller can fix; its message is one line that names the
offending thing (a file, a class, a module), so the CLI and the service can show it as it is.
"""


class EngineError(Exception):
    """Bad input: a one-line message naming what is wrong."""


class ConfigError(EngineError):
    """An unlearning configuration that cannot run (unknown method, missing retain source, ...)."""


class ModelPackageError(EngineError):
    """A model package that cannot be read, built or loaded strictly."""


class ImageSourceError(EngineError):
    """An image source that is missing, empty, unreadable or labelled with unknown classes."""


class UnsupportedModelError(EngineError):
    """A model the method cannot adapt (no linear layers with the requested names)."""


class NumericalError(EngineError):
    """The loss became non-finite: the run stops before any weight is corrupted."""


class UnlearningCancelled(Exception):
    """The caller asked the run to stop; nothing was written."""
