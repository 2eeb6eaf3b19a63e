"""The page (``/``), its assets (``/static/...``) and plotly.js served from the installed plotly package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

__all__ = ["STATIC_DIR", "plotly_js_path", "router"]

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
router = APIRouter(tags=["pages"])


def plotly_js_path() -> Path | None:
    """``plotly.min.js`` shipped inside the installed ``plotly`` Python package (no CDN), or None."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "package_data" / "plotly.min.js"
    return path if path.is_file() else None


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-store"}
    )


@router.get("/static/vendor/plotly.min.js", include_in_schema=False)
def plotly_js() -> FileResponse:
    path = plotly_js_path()
    if path is None:
        raise HTTPException(
            404, "plotly.js not found: install the 'plotly' package (pip install 'moe-lab[viz]')"
        )
    return FileResponse(path, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})
