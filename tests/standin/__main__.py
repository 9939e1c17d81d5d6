"""Run one stand-in server in its own process, as a separate machine would be: ``python -m standin --port 0``
(from tests/). It prints ``standin listening at URL`` once ready and serves until it is terminated or killed;
``GET /standin/stats`` tells how many chat requests it answered. Answers come from the marker judge."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from standin.judge import marker_judge
from standin.server import StandinConfig, StandinServer

READY = "standin listening at "


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m standin", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-s", type=float, default=0.0, help="seconds each chat request takes")
    parser.add_argument("--capacity", type=int, default=64, help="chat requests served at once; more wait in the queue")
    parser.add_argument("--queue", type=int, default=256, help="requests waiting beyond capacity before 503s")
    parser.add_argument("--model", action="append", default=[], help="a model it serves (repeat; default llava:7b)")
    parser.add_argument("--digest", action="append", default=[], metavar="MODEL=DIGEST", help="the digest it reports for MODEL")
    args = parser.parse_args(argv)
    config = StandinConfig(
        models=tuple(args.model) or ("llava:7b",), latency_s=args.latency_s, capacity=args.capacity, queue=args.queue,
        digests=dict(item.split("=", 1) for item in args.digest),
    )  # fmt: skip
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with StandinServer(marker_judge, config, port=args.port) as server:
        print(READY + server.url, flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    sys.exit(0)


if __name__ == "__main__":
    main()
