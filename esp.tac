# twistd -ny esp.tac: the same service tree as `twistd esp`, configured from $ESP_CONFIG,
# else ./esp.yaml when it exists, else the built-in defaults.
import os
import sys
from pathlib import Path

from twisted.application.service import Application

from esp.config import ConfigError, default_config_path, load_config
from esp.service import makeService

_path = os.environ.get("ESP_CONFIG")
try:
    _config = load_config(Path(_path) if _path else default_config_path())
except ConfigError as _error:
    sys.stderr.write(f"esp.tac: {_error}\n")
    raise SystemExit(1) from None

application = Application("esp")
makeService(_config, exit_on_start_failure=True).setServiceParent(application)
