"""Events out of the process: webhooks signed the Standard Webhooks way, delivered at least
once from the outbox by dispatchers on any number of nodes."""
