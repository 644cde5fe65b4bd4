"""Outbound benchmark: messages/s from a full queue to a remote MX (Postfix's ``smtp-sink``),
for ESP and, in the same run, for Postfix relaying the same load to the same sink.

    python bench/outbound.py [--messages 5000] [--size 2048] [--domains 10] [--no-anchor]

Both servers first take the messages in over SMTP with delivery held (ESP: outbound off, the
messages DKIM-signed at submission by an authenticated user; Postfix: ``defer_transports``);
then delivery is let go and the clock runs until the sink has received every message (the sink
exits after the last one).  Both relay to the sink as their smart host with at most
``--connections`` connections per destination (Postfix's default of 20).  Postfix's
processes come and go, so its CPU is the whole machine's (the sink's included), printed for
ESP too.  Only ratios from one run mean anything.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from smtp_accept import (  # noqa: E402
    PASSWORD,
    Result,
    cpu_seconds,
    rss_mib,
    start_cluster,
    start_esp,
    start_postfix,
    tree_pids,
)

from esp.storage.db import connect  # noqa: E402

BIN = Path(sys.executable).parent
SINK_HOST = "127.0.0.2"


def free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def message(n: int, size: int, domains: int) -> tuple[str, bytes]:
    recipient = f"user{n}@dest{n % domains}.test"
    header = (f"From: Alice <alice@example.test>\r\nTo: {recipient}\r\nSubject: bench {n}\r\n"
              f"Date: Sat, 28 Nov 2026 12:00:00 +0000\r\n"
              f"Message-ID: <bench.{n}@example.test>\r\n\r\n")
    line = "x" * 76 + "\r\n"
    body = line * max(1, (size - len(header)) // len(line))
    return recipient, (header + body).encode()


def submit_all(port: int, args: argparse.Namespace, login: bool) -> None:
    """The load, over ``--sessions`` SMTP sessions (authenticated for ESP's submission)."""
    work = list(range(args.messages))
    lock = threading.Lock()

    def session() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
            if login:
                client.login("alice@example.test", PASSWORD)
            while True:
                with lock:
                    if not work:
                        return
                    n = work.pop()
                recipient, data = message(n, args.size, args.domains)
                client.sendmail("alice@example.test", [recipient], data)

    threads = [threading.Thread(target=session) for _ in range(args.sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def start_sink(work: Path, port: int, messages: int) -> subprocess.Popen[bytes]:
    """smtp-sink that exits once it has received ``messages`` messages."""
    return subprocess.Popen(
        ["smtp-sink", "-u", "nobody", "-M", str(messages), f"{SINK_HOST}:{port}", "256"],
        stdout=subprocess.DEVNULL, stderr=open(work / "sink.log", "wb"),
    )


def wait_for_sink(sink: subprocess.Popen[bytes], started: float, what: str) -> float:
    try:
        sink.wait(timeout=3600)
    except subprocess.TimeoutExpired:
        sink.kill()
        raise SystemExit(f"{what} did not deliver everything within an hour") from None
    return time.monotonic() - started


# -- ESP -------------------------------------------------------------------------------------


def esp_config(work: Path, dsn: str, sink_port: int, args: argparse.Namespace,
               enabled: bool, workers: int = 1) -> Path:
    config = work / "esp.yaml"
    config.write_text(
        f"server:\n  hostname: mx.example.test\n  workers: {workers}\n"
        "  dns: {nameservers: ['127.0.0.1:9']}\n"
        "  smtp:\n    mx: {listen: 'tcp:0:interface=127.0.0.1'}\n"
        "    submission: {listen: 'tcp:0:interface=127.0.0.1'}\n"
        "    submissions: {listen: 'tcp:0:interface=127.0.0.1'}\n"
        "    connection_rate_per_ip: 0\n    connections_per_ip: 0\n"
        f"  outbound:\n    enabled: {str(enabled).lower()}\n"
        f"    relay: '{SINK_HOST}:{sink_port}'\n"
        f"    max_connections: {args.connections}\n"
        f"    max_connections_per_destination: {args.connections}\n"
        "    poll_interval: 0.1\n"
        f"storage:\n  data_dir: {work / 'var'}\n  database:\n    dsn: '{dsn}'\n"
        "security:\n  mailauth: {enabled: false}\n"
        "  auth:\n    allow_plaintext_on_loopback: true\n"
        "    argon2: {time_cost: 1, memory_cost_kib: 8192, parallelism: 1}\n"
    )
    return config


def run_esp(work: Path, args: argparse.Namespace, workers: int) -> Result:
    cluster = start_cluster(work)
    try:
        sink_port = free_port(SINK_HOST)
        config = esp_config(work, cluster.dsn, sink_port, args, enabled=False)
        generated = subprocess.run([str(BIN / "esp"), "--config", str(config), "dkim",
                                    "generate", "example.test"], capture_output=True, text=True)
        if generated.returncode != 0:
            raise SystemExit(f"esp dkim generate failed: {generated.stderr}")
        # 1. Fill the queue through submission (signed), delivery off.
        process, log = start_esp(work, config, "fill")
        port = int(re.search(r"smtp-submission-0 listening on 127\.0\.0\.1:(\d+)", log)
                   .group(1))  # type: ignore[union-attr]
        submit_all(port, args, login=True)
        process.terminate()
        process.wait(timeout=60)
        spooled = sum(1 for _ in (work / "var" / "spool" / "new").iterdir())
        if spooled != args.messages:
            raise SystemExit(f"ESP queued {spooled} of {args.messages} messages")
        # 2. Hold the queue, start ESP with delivery on, then make everything due at once
        #    (as `esp queue flush` does) and clock until the sink has them all.
        conn = connect(cluster.dsn)
        with conn.cursor() as cur:
            cur.execute("UPDATE queue SET next_attempt_at = now() + interval '1 day'")
        conn.commit()
        config = esp_config(work, cluster.dsn, sink_port, args, enabled=True, workers=workers)
        process, _ = start_esp(work, config, "drain")
        sink = start_sink(work, sink_port, args.messages)
        ours = (f"--config {config}", "esp.worker", "esp.storage.diskwriter")
        names = (*ours, "postgres")
        before = cpu_seconds(tree_pids(names))
        esp_before = cpu_seconds(tree_pids(ours))
        profiler = None
        if os.environ.get("ESP_BENCH_PROFILE"):
            profiler = subprocess.Popen(
                ["py-spy", "record", "-o", os.environ["ESP_BENCH_PROFILE"], "-f", "raw",
                 "-p", str(process.pid), "-d", "5", "-r", "200"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
        machine_before = machine_busy()
        started = time.monotonic()
        with conn.cursor() as cur:
            cur.execute("UPDATE queue SET next_attempt_at = now()")
        conn.commit()
        conn.close()
        seconds = wait_for_sink(sink, started, "ESP")
        machine = machine_busy() - machine_before
        if profiler is not None:
            profiler.wait()
        used = cpu_seconds(tree_pids(names)) - before
        esp_used = cpu_seconds(tree_pids(ours)) - esp_before
        memory = rss_mib(tree_pids(ours))
        print(f"  of which ESP {esp_used / args.messages * 1000:.2f} ms/msg, PostgreSQL "
              f"{(used - esp_used) / args.messages * 1000:.2f} ms/msg; whole machine (sink "
              f"included) {machine / args.messages * 1000:.2f} ms/msg")
        process.terminate()
        process.wait(timeout=60)
        label = f"ESP ({workers} process{'es' if workers > 1 else ''}, DKIM)"
        return Result(label, args.messages, seconds, used, memory)
    finally:
        cluster.stop()


# -- Postfix ---------------------------------------------------------------------------------


def run_postfix(work: Path, args: argparse.Namespace) -> Result | None:
    if not shutil.which("postfix") or os.geteuid() != 0:
        print("Postfix not installed (or not root): no anchor this run")
        return None
    work.mkdir(parents=True)
    sink_port = free_port(SINK_HOST)
    port = free_port("127.0.0.1")
    start_postfix(port, {
        "mynetworks": "127.0.0.0/8", "relayhost": f"[{SINK_HOST}]:{sink_port}",
        "default_destination_concurrency_limit": str(args.connections),
        "defer_transports": "smtp",
    }, empty_queue=True)
    try:
        time.sleep(1)  # master spawns its listeners (benchmark harness, not a test)
        submit_all(port, args, login=False)
        deadline = time.monotonic() + 600
        while queued_in_postfix() < args.messages:
            if time.monotonic() > deadline:
                raise SystemExit("Postfix did not queue everything")
            time.sleep(0.2)
        sink = start_sink(work, sink_port, args.messages)
        names = ("master", "qmgr", "smtp", "trivial-rewrite", "pickup", "bounce", "tlsmgr")
        machine_before = machine_busy()
        started = time.monotonic()
        subprocess.run(["postconf", "-e", "defer_transports="], check=True)
        subprocess.run(["postfix", "reload"], capture_output=True, check=True)
        subprocess.run(["postqueue", "-f"], check=True)
        seconds = wait_for_sink(sink, started, "Postfix")
        machine = machine_busy() - machine_before
        print(f"  whole machine (sink included) {machine / args.messages * 1000:.2f} ms/msg")
        used = machine
        memory = rss_mib(tree_pids(names))
    finally:
        subprocess.run(["postfix", "stop"], capture_output=True)
        subprocess.run(["postsuper", "-d", "ALL"], capture_output=True)
    return Result("Postfix 3 (relayhost)", args.messages, seconds, used, memory)


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all processes, /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def queued_in_postfix() -> int:
    spool = Path("/var/spool/postfix")
    return sum(1 for queue in ("incoming", "active", "deferred")
               for path in (spool / queue).rglob("*") if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--domains", type=int, default=10,
                        help="recipient domains the messages are spread over")
    parser.add_argument("--sessions", type=int, default=10, help="sessions filling the queue")
    parser.add_argument("--connections", type=int, default=20,
                        help="connections per destination, for both servers")
    parser.add_argument("--workers", type=int, nargs="*", default=[1],
                        help="ESP processes (server.workers) to try, e.g. --workers 1 2")
    parser.add_argument("--no-anchor", action="store_true")
    args = parser.parse_args()
    if not shutil.which("smtp-sink"):
        raise SystemExit("smtp-sink is missing: apt-get install postfix")
    work = Path(tempfile.mkdtemp(prefix="esp-bench-out-"))
    os.chmod(work, 0o711)  # noqa: S103
    print(f"{args.messages} messages of {args.size} bytes to {args.domains} domains, "
          f"{args.connections} connections per destination, {os.cpu_count()} cores")
    try:
        results = []
        for workers in dict.fromkeys(args.workers):
            results.append(run_esp(work / f"esp-{workers}", args, workers))
            print(results[-1].line(), flush=True)
        if not args.no_anchor:
            anchor = run_postfix(work / "postfix", args)
            if anchor is not None:
                print(anchor.line())
                for result in results:
                    print(f"{result.name} / Postfix: {result.rate / anchor.rate:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
