"""The dashboard's static files (HTML, JS, CSS), shipped as package data.

`WEB_DIR` is where the server finds them, in a checkout and in an installed copy.
"""

from pathlib import Path

WEB_DIR = Path(__file__).resolve().parent
