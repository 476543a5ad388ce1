"""One exception hierarchy for everything Djinn reports to a user.

Every error a caller can cause is a ``DjinnError`` subclass whose message says what to do next. Errors raised
inside a session never poison other sessions: the session that failed stays usable. The daemon maps these
classes across the wire by name (``ERRORS_BY_NAME``), so a remote caller catches the same types as a local one.
"""

from __future__ import annotations


class DjinnError(Exception):
    """Base class of every error Djinn raises on purpose."""


class ModelNotFoundError(DjinnError):
    """A model name or path that cannot be loaded offline."""


class InvalidTargetError(DjinnError):
    """A breakpoint or steering target (layer index or module path) that the model does not have."""


class InvalidTensorError(DjinnError):
    """A replacement or steering tensor of the wrong shape, dtype or device, or with NaN/Inf values."""


class InvalidArgumentError(DjinnError):
    """A bad argument that is neither a target nor a tensor (e.g. a negative token count)."""


class SessionBusyError(DjinnError):
    """A request that needs an idle session while its run is still paused or running."""


class RunFinishedError(DjinnError):
    """A resume, step or edit on a run that has already finished."""


class NotPausedError(DjinnError):
    """An edit or inspection that needs a paused run while the run is not paused."""


class SessionClosedError(DjinnError):
    """Use of a session after it was closed (by the user, or because its client went away)."""


class ExecutionError(DjinnError):
    """The model's forward pass itself raised; the run ended, the session is still usable."""


class OutOfMemoryError(DjinnError):
    """Neither the GPU budget nor the host pool can hold what a request needs right now."""


class WeightBudgetError(DjinnError):
    """A weight budget (``--weight-memory``) too small to serve a model even by streaming its decoder layers."""


class PagingError(DjinnError):
    """A page-out or page-in that could not be done; the session was left exactly as it was."""


class SessionLostError(DjinnError):
    """A session whose paged state could not be restored; it refuses every use but close."""


class EngineLostError(SessionLostError):
    """A session whose engine (one GPU's process in a cluster) died: its KV and run went with it; close it and open
    a new one. Sessions on the other engines are untouched."""


class DaemonConnectionError(DjinnError):
    """The daemon cannot be reached, refused the credentials, or speaks another protocol version."""


class ProtocolError(DaemonConnectionError):
    """A message that is unsigned, tampered with, replayed, malformed, or of another protocol version."""


class EncryptionUnavailableError(DaemonConnectionError):
    """A ``tcp://`` endpoint where this ZeroMQ cannot encrypt (no CURVE): refused rather than sent in clear."""


class PermissionDeniedError(DjinnError):
    """An operation reserved to the daemon's owner (shutting it down, its settings) asked by another user."""


class MessageTooLargeError(InvalidArgumentError):
    """A request with a frame larger than the daemon's maximum message size (``djinn serve --max-message-size``)."""


ERRORS_BY_NAME: dict[str, type[DjinnError]] = {
    cls.__name__: cls
    for cls in (
        DjinnError,
        ModelNotFoundError,
        InvalidTargetError,
        InvalidTensorError,
        InvalidArgumentError,
        SessionBusyError,
        RunFinishedError,
        NotPausedError,
        SessionClosedError,
        ExecutionError,
        OutOfMemoryError,
        WeightBudgetError,
        PagingError,
        SessionLostError,
        EngineLostError,
        DaemonConnectionError,
        ProtocolError,
        EncryptionUnavailableError,
        PermissionDeniedError,
        MessageTooLargeError,
    )
}
