"""The twistd plugin: ``twistd esp`` builds the service tree of :mod:`esp.tap`."""

from twisted.application.service import ServiceMaker

esp = ServiceMaker(
    "ESP",
    "esp.tap",
    "ESP mail server: SMTP, IMAP and a REST API for many domains",
    "esp",
)
