"""The IMAP server: wire format (:mod:`wire`), FETCH items (:mod:`fetch`), the protocol
(:mod:`server`) and its listeners (:mod:`service`)."""
