"""The REST management API."""
