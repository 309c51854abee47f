"""The OpenAI-compatible router: `router.app.create_app(runtime, metrics, api_key)` builds the FastAPI app.

This package imports nothing itself: its parser and body reader processes import only the modules
they use (`parser_child` needs the schemas and errors, not the app and its web stack).
"""
