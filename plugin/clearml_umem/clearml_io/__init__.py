"""ClearML at the edges: the model registry as a catalog, metrics as scalars, offline sessions.

Importing this package does not import the clearml SDK; each function imports it when
called, so the core serves from a manifest on machines without ClearML configured.
"""

from clearml_umem.clearml_io.metadata import SERVABLE_TAG, spec_from_clearml_model
from clearml_umem.clearml_io.offline import OfflineSession
from clearml_umem.clearml_io.registry import (
    Registration,
    RegistryCatalog,
    RegistrySelector,
    RegistryUnavailable,
    register_model,
    upsert_manifest_entry,
)
from clearml_umem.clearml_io.reporter import ClearMLReporter
from clearml_umem.clearml_io.session import clearml_configured, use_offline_unless_configured

__all__ = [
    "SERVABLE_TAG",
    "ClearMLReporter",
    "OfflineSession",
    "Registration",
    "RegistryCatalog",
    "RegistrySelector",
    "RegistryUnavailable",
    "clearml_configured",
    "register_model",
    "spec_from_clearml_model",
    "upsert_manifest_entry",
    "use_offline_unless_configured",
]
