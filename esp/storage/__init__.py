"""Storage: PostgreSQL (pool, migrations, embedded cluster) and Maildir; knows no protocol."""
