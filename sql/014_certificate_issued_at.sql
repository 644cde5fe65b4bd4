-- When a certificate was last issued here (manual renewals wait an hour after it).
ALTER TABLE certificates ADD COLUMN issued_at timestamptz;
