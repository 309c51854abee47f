"""The catalog a serve setting names: a local manifest, or the ClearML model repository.

At the edge on purpose: the server takes a catalog and never imports ClearML; the CLI, the serve
task and the benchmark build it here and hand it over."""

from __future__ import annotations

from clearml_umem.catalog import Catalog, ManifestCatalog
from clearml_umem.config import ConfigError, ServeConfig


def build_catalog(config: ServeConfig) -> Catalog:
    if config.manifest:
        return ManifestCatalog(config.manifest, default_engine=config.resolved_engine())
    from clearml_umem.clearml_io.registry import RegistryCatalog
    from clearml_umem.clearml_io.session import clearml_configured, offline_requested

    if offline_requested() or not clearml_configured():
        raise ConfigError("serving from the ClearML model repository needs a ClearML server, and none is configured "
                          "(run clearml-init, or set CLEARML_API_HOST, CLEARML_API_ACCESS_KEY and "
                          "CLEARML_API_SECRET_KEY); to serve without one, give a local manifest with --manifest")
    return RegistryCatalog.from_config(config)
