"""The dashboard's files: `/` is web/index.html, `/static/...` the rest of web/.

Plotly.js comes from the installed `plotly` Python package's own copy, never a
CDN, so the dashboard works offline.
"""

from __future__ import annotations

from pathlib import Path

import plotly
from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from layerwatch.web import WEB_DIR

router = APIRouter()

STATIC_SUFFIXES = (".html", ".js", ".css", ".svg", ".png", ".ico")

PLOTLY_JS = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html")


@router.get("/static/plotly.min.js", include_in_schema=False)
def plotly_js() -> FileResponse:
    return FileResponse(PLOTLY_JS, media_type="text/javascript")


@router.get("/static/{name}", include_in_schema=False)
def static_file(name: str) -> FileResponse:
    # A single path segment: no '/' reaches here, and '..' or hidden files are refused.
    path = WEB_DIR / name
    if name.startswith(".") or not path.is_file() or path.suffix not in STATIC_SUFFIXES:
        raise HTTPException(status_code=404, detail=f"no static file {name!r}")
    return FileResponse(path)
