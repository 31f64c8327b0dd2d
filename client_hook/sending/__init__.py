"""On the sender thread (and in `layerwatch upload`): getting frames to the server, torch-free.

    sender.py     the thread: the queue the training thread appends to, numbering, heartbeats, the loop
    pending.py    frames awaiting an ack: memory caps, spill to the spool, shed the cheapest first
    spool.py      the bounded on-disk spool, one folder per run in the user's private cache
    transport.py  one websocket to /ws/ingest: send a batch, await its ack (the sender's and upload's)
    upload.py     `layerwatch upload`: deliver a finished run's spool later

Nothing here imports torch: a sample's device-to-host copy is resolved through the
item's own `frames()` (client_hook/training/tensors.py), and the CLI runs without torch.
"""
