"""layerwatch's server: ingest over a websocket, storage, REST and live push.

Never imports torch. `server.main.create_app(settings)` builds the ASGI app;
`server.cli` is the `layerwatch` command.
"""

__version__ = "0.1.0"
