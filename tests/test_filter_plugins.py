"""A third party's filter and event subscriber: a package built here, installed into this environment with pip, with
its plugin module in its own ``twisted/plugins/``.  ESP finds it without any change to ESP,
checks its settings, and runs it in the chain."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dnszone import DNSServer
from tests.espserver import start_esp

PACKAGE = "esp-filter-shout-test"

FILTER = '''
from pydantic import Field
from zope.interface import implementer

from esp.filters import FilterSettings, Verdict
from esp.interfaces import IMessageFilter


class ShoutSettings(FilterSettings):
    word: str = Field(description="messages with this word are refused")


@implementer(IMessageFilter)
class Shout:
    name = "shout"

    def __init__(self, settings, services):
        self.settings = settings

    async def check(self, context):
        if self.settings.word.encode() in context.message:
            return Verdict.reject(f"we do not say {self.settings.word}", code=550)
        subject = str(context.parsed["Subject"] or "")
        return Verdict("tag", headers=(("X-Shout", subject.upper()),), keywords=("$Shouted",))
'''

PLUGIN = '''
import os

from twisted.plugin import IPlugin
from zope.interface import implementer

from esp.filters.builtin import FilterFactory
from esp.interfaces import IEventSubscriber
from esp_filter_shout import Shout, ShoutSettings

shout = FilterFactory("shout", "Shouts the subject (a test plugin)", ShoutSettings, Shout)


@implementer(IPlugin, IEventSubscriber)
class Tally:
    name = "shout-tally"
    patterns = ("message.received",)

    def handle(self, event):
        with open(os.environ["ESP_SHOUT_TALLY"], "a") as tally:
            tally.write(event.payload["user"] + "\\n")


tally = Tally()
'''

SETUP = '''
from setuptools import setup

setup(
    name="esp-filter-shout-test",
    version="1.0",
    packages=["esp_filter_shout", "twisted.plugins"],
)
'''


def pip(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check",
                             "-q", *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def shout_package(scratch: Path) -> Iterator[None]:
    source = scratch / "shout"
    (source / "esp_filter_shout").mkdir(parents=True)
    (source / "twisted" / "plugins").mkdir(parents=True)  # no __init__.py: Twisted's rule
    (source / "esp_filter_shout" / "__init__.py").write_text(textwrap.dedent(FILTER))
    (source / "twisted" / "plugins" / "esp_filter_shout_plugin.py").write_text(
        textwrap.dedent(PLUGIN))
    (source / "setup.py").write_text(textwrap.dedent(SETUP))
    pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(source))
    try:
        yield
    finally:
        pip("uninstall", "-y", PACKAGE)


def test_a_third_party_filter_is_found_configured_and_run(
    shout_package: None, module_scratch: Path, module_database_dsn: str, test_dns: DNSServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    listed = subprocess.run([sys.executable, "-m", "esp.cli", "filters", "list", "--json"],
                            capture_output=True, text=True, check=True, cwd=module_scratch)
    found = {f["name"]: f for f in json.loads(listed.stdout)}
    assert {"shout", "rspamd", "clamav", "ratelimit", "llm"} <= set(found)
    assert found["shout"]["settings"]["required"] == ["word"]

    tally = module_scratch / "tally"
    monkeypatch.setenv("ESP_SHOUT_TALLY", str(tally))  # read by the plugin in twistd
    esp = start_esp(module_scratch, module_database_dsn, test_dns.nameserver,
                    top="filters:\n  chain: [shout]\n  settings:\n    shout: {word: gadzooks}\n"
                        "events:\n  subscribers: [shout-tally]\n")
    try:
        esp.add_user("alice@example.test", "a long password")
        with smtplib.SMTP("127.0.0.1", esp.ports["mx"], timeout=60) as client:
            client.sendmail("bob@spf-pass.test", ["alice@example.test"],
                            b"From: bob@spf-pass.test\r\nSubject: quiet please\r\n\r\nhello\r\n")
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("bob@spf-pass.test", ["alice@example.test"],
                                b"Subject: oh\r\n\r\ngadzooks!\r\n")
        assert refused.value.smtp_code == 550 and b"we do not say gadzooks" in refused.value.smtp_error
        ((_uid, _size, name),) = esp.messages("alice@example.test")
        assert b"X-Shout: QUIET PLEASE\r\n" in esp.message_file("alice@example.test", name)
        # The package's event subscriber, enabled by events.subscribers, saw the delivery.
        assert tally.read_text() == "alice@example.test\n"
    finally:
        esp.process.stop()


def test_a_chain_naming_a_filter_that_is_not_installed_stops_the_start(
    module_scratch: Path, module_database_dsn: str, test_dns: DNSServer,
) -> None:
    (module_scratch / "bad").mkdir()
    with pytest.raises(AssertionError) as failed:
        start_esp(module_scratch / "bad", module_database_dsn, test_dns.nameserver,
                  top="filters:\n  chain: [nosuchfilter]\n")
    assert "nosuchfilter, not installed" in str(failed.value)
