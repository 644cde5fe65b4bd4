"""SMTP: the ESMTP server protocol (MX, submission, submissions) and its listeners."""
