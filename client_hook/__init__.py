"""layerwatch's training side. Import `client_hook.monitor` for the user API.

The folder says which thread a file runs on:

    monitor.py     the user API (`attach`, `Monitor.log/close`, `preflight`): the training thread
    training/      hooks and statistics, inside the user's step: the training thread
    sending/       queue, pending frames, spool, transport, upload: the sender thread (torch-free)
    preflight/     the pre-training checks, once, on copies of the model and batch
    wire.py        the wire schema, shared with the server (torch-free)
    catalog.py     every rule id with its severity, remedy and source (torch-free, shared)
    thresholds.py  thresholds a preflight check and the live rule of the same id share (torch-free)
    demo.py        `layerwatch demo`

This package's __init__ stays free of torch so that the server can import
`client_hook.wire` without pulling torch in.
"""

__version__ = "0.1.0"
