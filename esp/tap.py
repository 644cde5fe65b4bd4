"""``twistd esp``: command-line options and the service maker named by the plugin."""

from __future__ import annotations

from pathlib import Path

from twisted.application.service import IService
from twisted.python import usage

from esp.config import Config, ConfigError, default_config_path, load_config
from esp.filters.pipeline import FilterConfigError, resolve_chain
from esp.service import makeService as buildService
from esp.subscribers import SubscriberConfigError, chosen_subscribers


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run ESP.  Without --config, ./esp.yaml is used when it exists, else the built-in "
        "defaults: data under ./var, an embedded PostgreSQL cluster, unprivileged ports."
    )
    optParameters = [
        ["config", "c", None, "YAML configuration file (see docs/configuration.md)."],
    ]

    config: Config

    def postOptions(self) -> None:
        path = Path(self["config"]) if self["config"] else default_config_path()
        try:
            self.config = load_config(path)
            resolve_chain(self.config.filters.chain, self.config.filters.settings)
            chosen_subscribers(self.config.events.subscribers)
        except (ConfigError, FilterConfigError, SubscriberConfigError) as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> IService:
    return buildService(options.config, exit_on_start_failure=True)
