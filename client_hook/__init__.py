"""layerwatch's training side: hooks, statistics and the sender thread.

Import `client_hook.monitor` for the user API. This package's __init__ stays
free of torch so that the server can import `client_hook.wire` (the one wire
schema both sides share) without pulling torch in.
"""

__version__ = "0.1.0"
