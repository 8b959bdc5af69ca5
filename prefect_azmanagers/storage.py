"""The manifest's shared result storage: its `blob_container`, checked before anything runs.

Workers and detached VMs load the container block from the Prefect API by name; a name that
names no saved block, or a driver without prefect-azure, would otherwise surface mid-flow as a
404 on a worker. `result_storage(manifest)` fails first, saying what to do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect_azmanagers.exceptions import ConfigurationError

if TYPE_CHECKING:
    from prefect_azmanagers.blocks import AzureManifest


def result_storage(manifest: AzureManifest | None) -> str | None:
    """The block slug of the manifest's blob container (None without one), once the block is
    known to be saved in the current Prefect API."""
    slug = getattr(manifest, "result_storage_slug", None)
    if slug is None:
        return None
    try:
        from prefect_azure import AzureBlobStorageContainer
    except ImportError:
        raise ConfigurationError(
            f"The manifest names the blob container {manifest.blob_container!r}, which needs "
            "prefect-azure here and on the instances: pip install 'prefect-azmanagers[blob]'."
        ) from None
    from prefect_azmanagers.blocks import saved_names

    known = list(saved_names(AzureBlobStorageContainer).values())
    if manifest.blob_container not in known:
        raise ConfigurationError(
            f"The manifest's blob_container {manifest.blob_container!r} names no saved "
            f"AzureBlobStorageContainer block in this Prefect API (saved: {known or 'none'}). "
            f"Save one under that name (AzureBlobStorageContainer(...).save("
            f"{manifest.blob_container!r})), or set the manifest's blob_container to one of "
            "those, or to None."
        )
    return slug
