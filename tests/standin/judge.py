"""How the stand-in decides answers: from the markers in the images it is shown and the schema it is asked for."""

from __future__ import annotations

from typing import Any

from standin.markers import read_marker
from standin.server import SeenRequest


def marker_judge(seen: SeenRequest) -> dict[str, Any]:
    """Answers the test schemas: ``code`` (the first image's marker) and ``codes`` (every image's, in order)."""
    properties = seen.schema.get("properties", {})
    codes = [read_marker(image) for image in seen.images]
    if "codes" in properties:
        return {"codes": [c if c is not None else -1 for c in codes]}
    if "code" in properties:
        return {"code": codes[0] if codes and codes[0] is not None else -1}
    raise ValueError(f"the marker judge cannot answer schema {seen.schema_name!r}")
