"""Load: many concurrent clients stream a synthetic training each into one real server on SQLite.

    python -m bench.load [--clients 50] [--steps 1000] [--layers 10] [--batch-steps 16] [--procs 2]

Each client is a websocket connection sending what `monitor.attach(..., every=1)`
sends (tests/reliability/frames.py): run_start, then per step a scalars frame
(loss, lr), a signals frame and a layer_stats frame of 3 rows per layer, in
batches of --batch-steps steps, each batch waiting for its ack like the
sender does. Clients run as threads spread over --procs processes (so the
client side is not one GIL) and all start at once, as fast as the server
acks: the figures are the server's saturated throughput and the send->ack
latency under that load. Afterwards the database is checked: every run's
ledger holds each seq once.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import threading
import time

from bench._common import figure, machine, parser, percentile, server
from client_hook import wire

START_DELAY_S = 5.0  # time for the worker processes to start before the common start moment


def client(url: str, run_id: str, *, steps: int, layers: int, batch_steps: int, start_at: float) -> list[float]:
    """One client's whole run; returns its send->ack latencies in seconds, one per batch."""
    from websockets.sync.client import connect

    from tests.reliability import frames

    rng = random.Random(run_id)
    seq = 0

    def numbered(kind: str, step: int, fields: dict) -> dict:
        nonlocal seq
        seq += 1
        return wire.frame(kind, run_id=run_id, seq=seq - 1, step=step, **fields)

    def exchange(ws, batch: list[dict]) -> float:
        sent = time.perf_counter()
        ws.send(json.dumps(wire.batch(batch)))
        while (reply := json.loads(ws.recv()))["kind"] == "alert":  # alerts come just before the ack
            pass
        assert reply["kind"] == "ack" and len(reply["seqs"][run_id]) == len(batch), reply
        return time.perf_counter() - sent

    latencies = []
    time.sleep(max(0.0, start_at - time.time()))
    with connect(f"{url.replace('http', 'ws', 1)}/ws/ingest", max_size=wire.MAX_MESSAGE_BYTES, compression=None) as ws:
        start = frames.run_start_fields(name=run_id, layers=layers, time=time.time())
        exchange(ws, [numbered("run_start", 0, start)])
        for first in range(0, steps, batch_steps):
            batch = [
                numbered(kind, step, fields)
                for step in range(first, min(first + batch_steps, steps))
                for kind, fields in frames.step_fields(step, layers=layers, rng=rng, time=time.time())
            ]
            latencies.append(exchange(ws, batch))
        exchange(ws, [numbered("run_end", steps - 1, {"status": "finished", "time": time.time()})])
    return latencies


def worker(url: str, run_ids: list[str], options: dict, start_at: float, results: multiprocessing.Queue) -> None:
    """One process: its clients as threads; puts (latencies, finish time, errors) on `results`."""
    latencies: list[float] = []
    errors: list[str] = []

    def one(run_id: str) -> None:
        try:
            latencies.extend(client(url, run_id, start_at=start_at, **options))
        except Exception as exc:  # reported by the parent: a lost client is a failed benchmark
            errors.append(f"{run_id}: {exc!r}")

    threads = [threading.Thread(target=one, args=(run_id,)) for run_id in run_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put((latencies, time.time(), errors))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--layers", type=int, default=10, help="3 layer-stat rows (weight, grad, activation) per layer")
    p.add_argument("--batch-steps", type=int, default=16, help="steps per websocket message (3 frames a step)")
    p.add_argument("--procs", type=int, default=2, help="client processes")
    args = p.parse_args()
    if args.quick:
        args.clients, args.steps = 8, 100
    for name in ("clients", "steps", "layers", "batch_steps", "procs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, but got {getattr(args, name)}")
    print(f"machine: {machine()}")
    print(
        f"load: {args.clients} clients x {args.steps} steps, {args.layers} layers, "
        f"{args.batch_steps} steps a batch, {args.procs} client processes"
    )
    from tests.reliability.ledger import ledger_gaps, received_seqs

    run_ids = [f"load-{i:03d}" for i in range(args.clients)]
    options = {"steps": args.steps, "layers": args.layers, "batch_steps": args.batch_steps}
    context = multiprocessing.get_context("spawn")  # no forked copy of this process's threads or torch state
    with server() as (url, db):
        results: multiprocessing.Queue = context.Queue()
        start_at = time.time() + START_DELAY_S
        procs = [
            context.Process(target=worker, args=(url, run_ids[i :: args.procs], options, start_at, results))
            for i in range(min(args.procs, args.clients))
        ]
        for proc in procs:
            proc.start()
        outcomes = [results.get() for _ in procs]
        for proc in procs:
            proc.join()
        elapsed = max(finished for _, finished, _ in outcomes) - start_at
        errors = [e for _, _, errs in outcomes for e in errs]
        latencies = [lat for lats, _, _ in outcomes for lat in lats]
        frames_per_run = 3 * args.steps + 2
        bad = [r for r in run_ids if ledger_gaps(seqs := received_seqs(db, r)) != ([], [])
               or len(seqs) != frames_per_run]  # fmt: skip
    if errors:
        raise SystemExit("clients failed:\n" + "\n".join(errors[:10]))
    frames_total = args.clients * frames_per_run
    rows = args.clients * args.steps * 3 * args.layers
    figure("frames/s", f"{frames_total / elapsed:,.0f} ({frames_total:,} frames in {elapsed:.1f} s)")
    figure("layer-stat rows/s", f"{rows / elapsed:,.0f}")
    p50, p99 = percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3
    figure("send->ack per batch", f"p50 {p50:.0f} ms, p99 {p99:.0f} ms ({args.batch_steps * 3} frames a batch)")
    figure("runs incomplete or duplicated", f"{len(bad)} of {args.clients}")
    if bad:
        raise SystemExit(f"runs with lost or duplicated frames: {bad[:10]}")


if __name__ == "__main__":
    main()
