"""ESP: an email service provider server on Twisted (SMTP, IMAP, REST API, one process tree)."""

__version__ = "0.1.0"
