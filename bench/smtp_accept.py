"""SMTP acceptance benchmark: messages/s accepted *and durable* (Maildir file + index row), with
server CPU and memory, for ESP and, in the same run, for Postfix delivering into a Maildir.

    python bench/smtp_accept.py [--sessions 10] [--messages 5000] [--size 2048]

The load comes from Postfix's ``smtp-source`` (Debian package ``postfix``) when installed, else
from a small built-in client.  ESP runs with fsync on and its own PostgreSQL cluster (also fsync
on); sender authentication is off on both sides (Postfix does none by default), so the figures
compare the bare accept-and-store path.  Only ratios from one run mean anything.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from esp.addresses import parse_address  # noqa: E402
from esp.auth import PasswordHasher  # noqa: E402
from esp.config import Argon2Config  # noqa: E402
from esp.storage import directory  # noqa: E402
from esp.storage.cluster import EmbeddedCluster  # noqa: E402
from esp.storage.db import connect, run_sync  # noqa: E402
from esp.storage.migrations import apply_migrations_txn, load_migrations  # noqa: E402

BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    name: str
    messages: int
    seconds: float
    cpu_seconds: float
    rss_mib: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    def line(self) -> str:
        return (
            f"{self.name:<28} {self.rate:8.0f} msg/s  {self.seconds:6.1f} s  "
            f"CPU {self.cpu_seconds / self.messages * 1000:5.2f} ms/msg  "
            f"RSS {self.rss_mib:6.0f} MiB"
        )


# -- process accounting ----------------------------------------------------------------------


def tree_pids(names: tuple[str, ...], roots: tuple[int, ...] = ()) -> list[int]:
    """Processes whose name is one of ``names`` or whose command line holds one; with
    ``roots``, only those roots and their descendants (a worker left over from another run,
    or another PostgreSQL, must not be counted)."""
    pids = []
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            parents[int(entry.name)] = int(
                (entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if any(n == comm or n in cmdline for n in names):
            pids.append(int(entry.name))
    if not roots:
        return pids

    def descends(pid: int) -> bool:
        seen = 0
        while pid > 1 and seen < 64:
            if pid in roots:
                return True
            pid = parents.get(pid, 0)
            seen += 1
        return False

    return [pid for pid in pids if descends(pid)]


def postmaster_pid(cluster: EmbeddedCluster) -> int:
    return int((cluster.pgdata / "postmaster.pid").read_text().split()[0])


def cpu_seconds(pids: list[int], which: tuple[int, ...] = (11, 12)) -> float:
    """utime + stime of the processes (fields 14 and 15 of /proc/PID/stat)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(fields[i]) for i in which)
    return total / CLK_TCK


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


# -- load ------------------------------------------------------------------------------------


def drive(port: int, sessions: int, messages: int, size: int, recipient: str) -> float:
    """Send the load; return the seconds it took (all 250s received)."""
    started = time.monotonic()
    if shutil.which("smtp-source"):
        subprocess.run(
            ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size),
             "-M", "client.test", "-f", "sender@client.test", "-t", recipient, "-d",
             f"127.0.0.1:{port}"],
            check=True, timeout=3600,
        )
    else:
        body = ("Subject: bench\r\n\r\n" + "x" * 76 + "\r\n") * max(1, size // 80)
        per_session = [messages // sessions + (1 if i < messages % sessions else 0)
                       for i in range(sessions)]

        def session(count: int) -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
                for _ in range(count):
                    client.sendmail("sender@client.test", [recipient], body)

        threads = [threading.Thread(target=session, args=(n,)) for n in per_session]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return time.monotonic() - started


def count_files(directory: Path) -> int:
    return sum(1 for _ in directory.iterdir()) if directory.exists() else 0


# -- ESP -------------------------------------------------------------------------------------


def start_esp(work: Path, config: Path, name: str, workers: int = 1
              ) -> tuple[subprocess.Popen[bytes], str]:
    """`twistd esp` with ``config``, logging to ``<work>/<name>.log``; returns once it and its
    ``workers - 1`` worker processes are ready (a worker still starting would leave every
    connection of the load to the others), with its log so far."""
    log_path = work / f"{name}.log"
    process = subprocess.Popen(
        [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile=-", "esp", "--config",
         str(config)],
        stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while True:
        text = log_path.read_text()
        if text.count("ready: host") >= workers:
            return process, text
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"ESP did not start:\n{text}")
        time.sleep(0.05)  # a benchmark harness, not a test: polling the log is fine


PASSWORD = "bench password"  # noqa: S105 (a throwaway account)


def start_cluster(work: Path) -> EmbeddedCluster:
    """A private PostgreSQL cluster in ``work/pg`` with ESP's schema, the domain example.test
    and alice@example.test (password PASSWORD, Maildir under ``work/var``); stopped again if
    any of that fails."""
    work.mkdir(parents=True)
    os.chmod(work, 0o711)  # noqa: S103 (the cluster's account must reach it when run as root)
    cluster = EmbeddedCluster(work / "pg")
    cluster.start()
    try:
        conn = connect(cluster.dsn)
        run_sync(conn, apply_migrations_txn, load_migrations())
        run_sync(conn, directory.add_domain_txn, "example.test")
        hashed = PasswordHasher(Argon2Config(time_cost=1, memory_cost_kib=8192,
                                             parallelism=1)).hash(PASSWORD)
        run_sync(conn, directory.add_user_txn, parse_address("alice@example.test"), hashed,
                 work / "var" / "maildir")
        conn.close()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def filter_section(chain: str, services: dict[str, int]) -> str:
    """The ``filters`` configuration for ``chain`` (names joined by commas) with the ports of
    the Rspamd and clamd this run started."""
    if not chain:
        return ""
    rspamd, clamav = services.get("rspamd", 0), services.get("clamav", 0)
    settings = {
        "rspamd": f"    rspamd: {{url: 'http://127.0.0.1:{rspamd}'}}\n",
        "clamav": f"    clamav: {{address: 'tcp:host=127.0.0.1:port={clamav}'}}\n",
        # Limits no run reaches: the cost of counting, shared through PostgreSQL.
        "ratelimit": "    ratelimit: {per_ip: {count: 1000000000, seconds: 1}}\n",
    }
    names = chain.split(",")
    return (f"filters:\n  chain: [{', '.join(names)}]\n  settings:\n"
            + "".join(settings[n] for n in names if n in settings))


def esp_config(work: Path, dsn: str, workers: int | None = 1, server: str = "",
               database: str = "", security: str = "", top: str = "") -> str:
    """ESP's configuration for a benchmark: every listener on a free loopback port, no
    connection limits, no SPF/DKIM/DMARC lookups (no DNS here), data under ``work``.
    ``server``, ``database`` and ``security`` continue those sections; ``top`` adds sections."""
    return (
        "server:\n  hostname: mx.example.test\n"
        + (f"  workers: {workers}\n" if workers is not None else "")
        + "  dns: {nameservers: ['127.0.0.1:9']}\n"
        "  smtp:\n    mx: {listen: 'tcp:0:interface=127.0.0.1'}\n"
        "    submission: {listen: 'tcp:0:interface=127.0.0.1'}\n"
        "    submissions: {listen: 'tcp:0:interface=127.0.0.1'}\n"
        "    connection_rate_per_ip: 0\n    connections_per_ip: 0\n"
        "  api: {listen: 'tcp:0:interface=127.0.0.1'}\n"
        "  metrics: {listen: 'tcp:0:interface=127.0.0.1'}\n"
        + server
        + f"storage:\n  data_dir: {work / 'var'}\n  database:\n    dsn: '{dsn}'\n"
        + database
        + "security:\n  mailauth: {enabled: false}\n"
        + security
        + top
    )


def run_esp(work: Path, args: argparse.Namespace, workers: int, chain: str = "",
            services: dict[str, int] | None = None) -> Result:
    cluster = start_cluster(work)
    try:
        config = work / "esp.yaml"
        config.write_text(esp_config(
            work, cluster.dsn, workers,
            database=f"    pool_max: {os.environ.get('ESP_BENCH_POOL', '10')}\n",
            top=filter_section(chain, services or {})))
        process, text = start_esp(work, config, "esp", workers)
        match = re.search(r"smtp-mx-0 listening on 127\.0\.0\.1:(\d+)", text)
        assert match is not None, text
        port = int(match.group(1))
        ours = (f"--config {config}", "esp.worker", "esp.storage.diskwriter")
        names = (*ours, "postgres")
        roots = (process.pid, postmaster_pid(cluster))
        pids = tree_pids(names, roots)
        esp_pids = tree_pids(ours, roots)
        before, esp_before = cpu_seconds(pids), cpu_seconds(esp_pids)
        writer_before = cpu_seconds(tree_pids(("esp.storage.diskwriter",), roots))
        esp_sys_before = cpu_seconds(esp_pids, (12,))
        profiler = None
        if os.environ.get("ESP_BENCH_STRACE"):
            profiler = subprocess.Popen(
                ["timeout", "-s", "INT", "5", "strace", "-f", "-c", "-o",
                 os.environ["ESP_BENCH_STRACE"], "-p", str(process.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        if os.environ.get("ESP_BENCH_PROFILE"):
            profiler = subprocess.Popen(
                ["py-spy", "record", "-o", os.environ["ESP_BENCH_PROFILE"], "-f", "raw",
                 "-p", str(process.pid), "-d", os.environ.get("ESP_BENCH_PROFILE_SECONDS", "8"),
                 "-r", "200", "--gil"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        seconds = drive(port, args.sessions, args.messages, args.size, "alice@example.test")
        if profiler is not None:
            profiler.wait()
        pids = tree_pids(names, roots)
        used = cpu_seconds(pids) - before
        esp_used = cpu_seconds(tree_pids(ours, roots)) - esp_before
        esp_sys = cpu_seconds(tree_pids(ours, roots), (12,)) - esp_sys_before
        writer = cpu_seconds(tree_pids(("esp.storage.diskwriter",), roots)) - writer_before
        print(f"  of which ESP processes {esp_used / args.messages * 1000:.2f} ms/msg "
              f"({esp_sys / args.messages * 1000:.2f} in the kernel; Maildir writers "
              f"{writer / args.messages * 1000:.2f}), "
              f"PostgreSQL {(used - esp_used) / args.messages * 1000:.2f} ms/msg")
        memory = rss_mib(tree_pids(ours, roots))
        stored = count_files(work / "var" / "maildir" / "example.test" / "alice" / "new")
        process.terminate()
        process.wait(timeout=60)
        if stored != args.messages:
            raise SystemExit(f"ESP stored {stored} of {args.messages} messages")
        label = f"ESP ({workers} worker{'s' if workers > 1 else ''}" + (
            f", filters {chain})" if chain else ")")
        return Result(label, stored, seconds, used, memory)
    finally:
        cluster.stop()


def start_filter_services(work: Path) -> dict[str, Any]:
    """A private Rspamd and clamd as the filter tests run them (tests/filterservices.py), with
    Rspamd's resolver on a dead loopback port: nothing leaves the machine."""
    from tests.filterservices import start_clamd, start_rspamd

    return {
        "clamav": start_clamd(work / "clamd"),
        "rspamd": start_rspamd(work / "rspamd", 9, Path.home() / ".cache" / "esp-tests" /
                               "rspamd-hs"),
    }


# -- Postfix ---------------------------------------------------------------------------------


def run_postfix(work: Path, args: argparse.Namespace, port: int) -> Result | None:
    if not shutil.which("postfix") or os.geteuid() != 0:
        print("Postfix not installed (or not root): no anchor this run")
        return None
    base = work / "maildir"
    base.mkdir(parents=True)
    shutil.chown(base, "postfix", "postfix")
    maps = Path("/etc/postfix/esp_bench_vmailbox")
    maps.write_text("alice@example.test example.test/alice/\n")
    # postmap reads main.cf, which a fresh install ("No configuration") does not have yet;
    # start_postfix writes it afresh anyway.
    Path("/etc/postfix/main.cf").touch()
    subprocess.run(["postmap", str(maps)], check=True)
    start_postfix(port, {
        "virtual_mailbox_domains": "example.test", "virtual_mailbox_maps": f"hash:{maps}",
        "virtual_mailbox_base": str(base), "virtual_uid_maps": "static:" + _uid("postfix"),
        "virtual_gid_maps": "static:" + _gid("postfix"),
    })
    try:
        time.sleep(1)  # master spawns its listeners (benchmark harness, not a test)
        names = ("master", "smtpd", "cleanup", "qmgr", "virtual", "trivial-rewrite", "pickup")
        pids = tree_pids(names)
        before = cpu_seconds(pids)
        started = time.monotonic()
        drive(port, args.sessions, args.messages, args.size, "alice@example.test")
        target = base / "example.test" / "alice" / "new"
        while count_files(target) < args.messages:  # delivered into Maildir, not just queued
            if time.monotonic() - started > 3600:
                raise SystemExit("Postfix did not deliver everything")
            time.sleep(0.05)
        seconds = time.monotonic() - started
        pids = tree_pids(names)
        used = cpu_seconds(pids) - before
        memory = rss_mib(pids)
    finally:
        subprocess.run(["postfix", "stop"], capture_output=True)
    return Result("Postfix 3 (virtual Maildir)", args.messages, seconds, used, memory)


def start_postfix(port: int, settings: dict[str, str], empty_queue: bool = False) -> None:
    """This machine's Postfix on 127.0.0.1:``port`` with ``settings`` over the benches' base
    (no DNS, no client limits, its own log).  The bench owns the Postfix configuration:
    main.cf is written afresh."""
    Path("/etc/postfix/main.cf").write_text("")
    base = {
        "inet_interfaces": "127.0.0.1", "inet_protocols": "ipv4", "mydestination": "",
        "maillog_file": "/var/log/postfix-esp-bench.log",
        "smtpd_peername_lookup": "no", "smtp_dns_support_level": "disabled",
        "smtp_host_lookup": "native", "compatibility_level": "3.6",
        "smtpd_client_connection_count_limit": "0", "smtpd_client_connection_rate_limit": "0",
        "default_process_limit": "100",
    }
    settings = {**base, **settings}
    subprocess.run(["postconf", "-e", *[f"{k}={v}" for k, v in settings.items()]], check=True)
    master = Path("/etc/postfix/master.cf")
    lines = [line for line in master.read_text().splitlines()
             if not re.match(r"^(smtp|127\.0\.0\.1:\d+)\s+inet", line)]
    lines.insert(0, f"127.0.0.1:{port} inet n - y - - smtpd")
    master.write_text("\n".join(lines) + "\n")
    if not Path("/var/spool/postfix/etc").exists():
        subprocess.run(["/usr/lib/postfix/configure-instance.sh", "-"], check=False)
    subprocess.run(["postfix", "stop"], capture_output=True)
    if empty_queue:
        subprocess.run(["postsuper", "-d", "ALL"], capture_output=True)
    started = subprocess.run(["postfix", "start"], capture_output=True, text=True)
    if started.returncode != 0:
        raise SystemExit(f"postfix start failed: {started.stderr}")


def _uid(name: str) -> str:
    import pwd

    return str(pwd.getpwnam(name).pw_uid)


def _gid(name: str) -> str:
    import grp

    return str(grp.getgrnam(name).gr_gid)


def run_round(work: Path, args: argparse.Namespace) -> dict[str, float]:
    """ESP in each configuration, then Postfix on the same load: each result's ratio to
    Postfix (empty without the anchor)."""
    results = []
    for workers in dict.fromkeys(args.workers):
        results.append(run_esp(work / f"esp-{workers}", args, workers))
        print(results[-1].line(), flush=True)
    if args.filters:
        services = start_filter_services(work / "filters")
        try:
            ports = {name: service.port for name, service in services.items()}
            for chain in args.filters:
                for workers in dict.fromkeys(args.workers):
                    name = f"esp-{workers}-{chain.replace(',', '-')}"
                    results.append(run_esp(work / name, args, workers, chain, ports))
                    print(results[-1].line(), flush=True)
        finally:
            for service in services.values():
                service.stop()
    if args.no_anchor:
        return {}
    anchor = run_postfix(work / "postfix", args, 2525)
    if anchor is None:
        return {}
    print(anchor.line())
    for r in results:
        print(f"{r.name} / Postfix: {r.rate / anchor.rate:.2f}x", flush=True)
    return {r.name: r.rate / anchor.rate for r in results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, os.cpu_count() or 1])
    parser.add_argument("--no-anchor", action="store_true")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat ESP then Postfix this many times and print each "
                             "configuration's median ratio (this machine's speed drifts "
                             "between runs; a ratio is only good within its round)")
    parser.add_argument("--filters", nargs="*", default=[], metavar="CHAIN",
                        help="also run with these filter chains (e.g. clamav,rspamd): a private "
                             "Rspamd and clamd are started for the run")
    parser.add_argument("--keep", action="store_true",
                        help="leave the data behind (see bench/README.md: deleting many files "
                             "slows file creation for minutes on some filesystems)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="esp-bench-"))
    os.chmod(work, 0o711)  # noqa: S103
    print(f"{args.sessions} sessions, {args.messages} messages of {args.size} bytes, "
          f"{os.cpu_count()} cores; load from "
          f"{'smtp-source' if shutil.which('smtp-source') else 'built-in client'}")
    ratios: dict[str, list[float]] = {}
    try:
        for round_ in range(args.rounds):
            if args.rounds > 1:
                print(f"-- round {round_ + 1} of {args.rounds}", flush=True)
            here = work / f"round-{round_ + 1}" if args.rounds > 1 else work
            for name, ratio in run_round(here, args).items():
                ratios.setdefault(name, []).append(ratio)
        if args.rounds > 1:
            for name, values in ratios.items():
                shown = ", ".join(f"{v:.2f}" for v in values)
                print(f"{name} / Postfix, median of {len(values)} rounds: "
                      f"{statistics.median(values):.2f}x ({shown})")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
