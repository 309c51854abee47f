"""The manifest's JSON Schema, built from the table the loader checks keys against
(`spec.MANIFEST_FIELDS`), so an editor and the server accept the same files.

`python -m clearml_umem.manifest_schema` prints it; `manifest.schema.json` beside this module
is its output, shipped with the package (a test checks the two are the same).
"""

from __future__ import annotations

import json
from typing import Any

from clearml_umem.catalog import MANIFEST_TOP_LEVEL
from clearml_umem.spec import MANIFEST_FIELDS


def manifest_schema() -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for f in MANIFEST_FIELDS:
        schema = dict(f.schema)
        # an optional key left empty in YAML (`context_length:`) is null, which the loader takes as absent
        prop = schema if f.required else {"anyOf": [schema, {"type": "null"}]}
        properties[f.name] = {"description": f.description, **prop}
    model = {
        "type": "object",
        "properties": properties,
        "required": [f.name for f in MANIFEST_FIELDS if f.required],
        "additionalProperties": False,
    }
    top = {key: {"type": "array", "items": {"$ref": "#/$defs/model"}} for key in MANIFEST_TOP_LEVEL}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "clearml-umem manifest",
        "description": "The models `clearml-umem serve --manifest FILE` serves (docs/configuration.md).",
        "type": "object",
        "properties": top,
        "required": ["models"],
        "additionalProperties": False,
        "$defs": {"model": model},
    }


def schema_text() -> str:
    return json.dumps(manifest_schema(), indent=2) + "\n"


def main() -> None:
    print(schema_text(), end="")


if __name__ == "__main__":
    main()
