"""The project's exception types: each says what went wrong and how to fix it.

Every error a user can cause or meet derives from `AzManagersError`, so callers can catch the
project's errors without catching programming mistakes. Subclasses live next to the concept
they belong to only when they carry extra fields; the plain ones are here.
"""

from __future__ import annotations


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
    """The subscription's quota is too small for the request (the message gives the numbers)."""


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
