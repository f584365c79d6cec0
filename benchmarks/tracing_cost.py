"""What tracing costs the hot paths: the ceiling's 1-text misses (null engine) and the cache hits,
with tracing off and on, alternating off/on/off/on on one machine.

On, every process exports OTLP over HTTP to a sink on loopback that answers 200 and keeps nothing
(`OTEL_TRACES_EXPORTER=otlp`, the SDK's batch processor, every span sampled): the cost of making,
linking and exporting the spans, not of a collector.

    python -m benchmarks.tracing_cost --duration 10 --out benchmarks/results/tracing.json
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from benchmarks import ceiling, machine, service
from benchmarks.report import writable_file
from benchmarks.workload import UniqueTexts, default_shared_dir, load_texts
from sentiment.arguments import count, seconds
from sentiment.embedded import free_port

TRACING_ON = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}


class _Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@contextmanager
def tracing(on: bool) -> Iterator[None]:
    """The processes started inside trace to a sink (on) or not at all."""
    if not on:
        yield
        return
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    env = {**TRACING_ON, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_port}"}
    os.environ.update(env)
    try:
        yield
    finally:
        for name in env:
            del os.environ[name]
        sink.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=seconds, default=10.0)
    parser.add_argument("--rounds", type=count, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    writable_file(args.out, "--out", "tracing_cost")  # (a file here: the other commands' --out is a directory)
    shared = default_shared_dir()
    model = shared / "models" / "distilbert-sst2-small"
    texts = UniqueTexts(load_texts(shared / "data" / "sst2-train.tsv"))
    quiet = lambda *_: None  # noqa: E731
    runs = []
    for _ in range(args.rounds):
        for on in (False, True):
            with tracing(on):
                misses = ceiling.measure(model, texts, args.duration, 2.0, quiet)
                hits = service.measure(model, "cpu", texts, [], 32, args.duration, 2.0, quiet)
            miss, hit = cast(list[dict[str, Any]], misses["points"])[0], cast(dict[str, Any], hits["cache_hits"])
            runs.append(
                {
                    "tracing": "on" if on else "off",
                    "miss_requests_per_s": miss["requests_per_s"],
                    "miss_api_cpu_us_per_request": miss["api_cpu_us_per_request"],
                    "miss_worker_cpu_us_per_text": miss["worker_cpu_us_per_text"],
                    "miss_p99_ms": miss["p99_ms"],
                    "hit_requests_per_s": hit["requests_per_s"],
                    "hit_p99_ms": hit["p99_ms"],
                }
            )
            print(json.dumps(runs[-1]), flush=True)
    args.out.write_text(json.dumps({"machine": machine.describe("cpu"), "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
