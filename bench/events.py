"""Events benchmark: webhook deliveries per second to a local receiver, and what the outbox
costs SMTP acceptance (the same load with and without a webhook that wants every delivery).

    python bench/events.py [--sessions 10] [--messages 3000] [--size 2048]

ESP as in ``bench/smtp_accept.py`` (its own PostgreSQL, fsync on, one worker). The receiver is
a small threaded HTTP server on loopback answering 200 at once; deliveries/s is measured from
the first message's 250 to the last webhook call, for the same messages.  Only ratios from
one run mean anything.
"""

from __future__ import annotations

import argparse
import http.server
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smtp_accept import (
    Result,
    count_files,
    cpu_seconds,
    drive,
    esp_config,
    rss_mib,
    start_cluster,
    start_esp,
    tree_pids,
)

from esp.storage.db import connect, run_sync


class Receiver:
    def __init__(self) -> None:
        self.count = 0
        self.last = 0.0
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                with receiver.lock:
                    receiver.count += 1
                    receiver.last = time.monotonic()

            def log_message(self, *args: Any) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 256  # the default 5 drops SYNs of 32 calls at once

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def run(work: Path, args: argparse.Namespace, hook: Receiver | None) -> tuple[Result, float]:
    cluster = start_cluster(work)
    try:
        if hook is not None:
            conn = connect(cluster.dsn)
            run_sync(conn, lambda cur: cur.execute(
                "INSERT INTO webhooks (url, event_types, secret) VALUES (%s, %s, %s)",
                (f"http://127.0.0.1:{hook.port}/hook", ["message.received"],
                 "whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=")))
            conn.close()
        config = work / "esp.yaml"
        config.write_text(esp_config(
            work, cluster.dsn,
            top="events:\n  webhooks: {allow_networks: ['127.0.0.0/8'], concurrency: 32,\n"
                "             retry_schedule: [1, 1, 1, 1, 1]}\n"))
        process, text = start_esp(work, config, "esp")
        match = re.search(r"smtp-mx-0 listening on 127\.0\.0\.1:(\d+)", text)
        assert match is not None, text
        names = (f"--config {config}", "esp.storage.diskwriter", "postgres")
        before = cpu_seconds(tree_pids(names))
        started = time.monotonic()
        seconds = drive(int(match.group(1)), args.sessions, args.messages, args.size,
                        "alice@example.test")
        used = cpu_seconds(tree_pids(names)) - before
        delivered_in = 0.0
        if hook is not None:
            deadline = time.monotonic() + 600
            while hook.count < args.messages and time.monotonic() < deadline:
                time.sleep(0.05)  # a benchmark harness, not a test
            delivered_in = hook.last - started
            if hook.count < args.messages:
                raise SystemExit(f"only {hook.count} of {args.messages} webhook calls arrived")
        memory = rss_mib(tree_pids(names[:2]))
        stored = count_files(work / "var" / "maildir" / "example.test" / "alice" / "new")
        process.terminate()
        process.wait(timeout=60)
        if stored != args.messages:
            raise SystemExit(f"ESP stored {stored} of {args.messages} messages")
        label = "ESP, a webhook for every message" if hook else "ESP, no webhooks"
        return Result(label, stored, seconds, used, memory), delivered_in
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="esp-bench-events-"))
    os.chmod(work, 0o711)  # noqa: S103
    try:
        bare, _ = run(work / "bare", args, None)
        print(bare.line(), flush=True)
        receiver = Receiver()
        hooked, delivered_in = run(work / "hooked", args, receiver)
        print(hooked.line(), flush=True)
        print(f"webhook deliveries: {receiver.count} in {delivered_in:.1f} s from the first "
              f"message = {receiver.count / delivered_in:.0f}/s (the last one "
              f"{delivered_in - hooked.seconds:.1f} s after the last 250)")
        print(f"acceptance with the outbox / without: {hooked.rate / bare.rate:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
