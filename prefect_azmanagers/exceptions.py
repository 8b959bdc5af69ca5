"""The project's exception types: each says what went wrong and how to fix it.

Every error a user can cause or meet derives from `AzManagersError`, so callers can catch the
project's errors without catching programming mistakes. Every type is here but those that
need their concept's own types (`cluster.protocol.FrameTooLarge` names a frame `Kind`).
"""

from __future__ import annotations

from typing import Any


class AzManagersError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigurationError(AzManagersError):
    """A manifest, template or key file is missing, malformed or unsafe."""


class ManifestNotFound(ConfigurationError):
    """No manifest block of the requested name exists."""


class TemplateNotFound(ConfigurationError):
    """No template block of the requested name exists (the message lists the known ones)."""


class TemplateError(ConfigurationError):
    """A template document does not have the shape of an AzManagers template."""


class KeyFileError(ConfigurationError):
    """An SSH key file is missing, unreadable, or readable by other users."""


class LockFileError(ConfigurationError):
    """customenv: the project's lock file cannot be turned into pinned requirements."""


class AzureError(AzManagersError):
    """An Azure Resource Manager request failed; `code` is ARM's error code when known."""

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.status = status


class QuotaExceeded(AzureError):
    """The subscription's quota is too small for the request (the message gives the numbers).

    `fits`: how many of the requested instances the quota has room for now (None: not known),
    so adaptive capacity can grow up to the quota instead of failing."""

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 fits: int | None = None):
        super().__init__(message, code=code, status=status)
        self.fits = fits


class AllocationFailed(AzureError):
    """Azure could not allocate the requested capacity."""


class SkuNotAvailable(AzureError):
    """The VM size is not offered in this region or to this subscription."""


class SpotRequestError(AzureError):
    """A spot request was refused (max price or VM size)."""


class ResourceMissing(AzureError):
    """An Azure resource that was expected to exist does not."""


class AuthenticationFailed(AzureError):
    """The credential was refused, or no credential could be obtained."""


class ScaleSetInUse(ConfigurationError):
    """Another live cluster holds the scale set named by `group=` (its lease tag is fresh)."""


class CustomDataTooLarge(AzManagersError):
    """The boot script (customData) exceeds Azure's size limit."""


class BootFailed(AzManagersError):
    """An instance's boot script failed or never finished; the message holds its log tail."""


class JoinTimeout(AzManagersError):
    """Workers did not join before the deadline; the message names the instances."""


class WorkerLost(AzManagersError):
    """A worker was lost (evicted, killed, disconnected) while running a task."""


class HostKeyMismatch(AzManagersError):
    """An instance presented an SSH host key different from the one recorded for it."""


class VersionMismatch(ConfigurationError):
    """A worker's Python, cloudpickle or Prefect version cannot run the driver's tasks."""


class InstanceGone(AzManagersError):
    """The cloud reported the instance gone: nothing connects to its address any more."""


class PrefectAPIUnreachable(AzManagersError):
    """The Prefect API cannot be reached from where it must be (driver or VM)."""


class PayloadError(AzManagersError):
    """A task or job argument cannot be pickled (the message names the argument)."""


class DetachedJobError(AzManagersError):
    """A detached job cannot be found, was cancelled, or did not finish in time."""


class UntrustedPayload(AzManagersError):
    """A detached job's payload or result failed its authentication (missing, forged, duplicated)."""


class ProtocolError(AzManagersError):
    """The byte stream is not a sequence of valid frames (corruption or a foreign writer)."""


class RunNotStarted(PayloadError):
    """What the driver sent for a task run cannot be rebuilt on the worker (an argument, the
    task, the flow run's context), so Prefect's task engine never started there."""


class MPIRankError(AzManagersError):
    """A rank other than 0 raised while running a call; the message holds its traceback."""

    def __init__(self, rank: int, size: int, error_type: str, message: str, remote_traceback: str):
        super().__init__(
            f"MPI rank {rank} of {size} failed: {error_type}: {message}\n"
            f"--- traceback on rank {rank} ---\n{remote_traceback}")
        self.rank = rank
        self.size = size
        self.error_type = error_type
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[Any, ...]:
        message = str(self).split("\n", 1)[0].split(": ", 2)[-1]
        return (MPIRankError, (self.rank, self.size, self.error_type, message,
                               self.remote_traceback))
