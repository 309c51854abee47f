"""The OpenAI-compatible router: `create_app(runtime, metrics, api_key)` builds the FastAPI app."""

from clearml_umem.router.app import create_app

__all__ = ["create_app"]
