-- The delivery workers record the outcome of a batch of attempts with one call (one round
-- trip, plans cached by PL/pgSQL) instead of four statements per batch.
--
-- p_ids/p_waits/p_errors: per queue row, the wait before its next attempt (if recipients are
-- left) and its last error.  r_*: per recipient, its outcome.  Rows not leased to p_owner are
-- left alone and not returned; for the others: the row's new status, and whether its message
-- has nothing left to deliver (its spool file can go).
CREATE FUNCTION esp_finish_attempts(
    p_owner text, p_now timestamptz,
    p_ids bigint[], p_waits integer[], p_errors text[],
    r_queue_ids bigint[], r_addresses text[], r_statuses text[], r_codes integer[],
    r_errors text[], r_status_codes text[], r_mtas text[]
) RETURNS TABLE (queue_id bigint, status text, message_done boolean)
LANGUAGE plpgsql AS $$
DECLARE
    held bigint[];
    i integer;
BEGIN
    SELECT array_agg(q.id ORDER BY q.id) INTO held FROM (
        SELECT id FROM queue
        WHERE id = ANY(p_ids) AND queue.status = 'delivering' AND lease_owner = p_owner
        ORDER BY id FOR UPDATE
    ) q;
    IF held IS NULL THEN
        RETURN;
    END IF;

    -- One primary-key lookup per recipient, whatever the table's statistics say (a join
    -- with the arrays is planned as a scan of the whole table while it is young).
    FOR i IN 1 .. coalesce(array_length(r_queue_ids, 1), 0) LOOP
        CONTINUE WHEN NOT r_queue_ids[i] = ANY(held);
        UPDATE queue_recipients
        SET status = r_statuses[i], last_code = r_codes[i], last_error = r_errors[i],
            status_code = r_status_codes[i], remote_mta = r_mtas[i], updated_at = now()
        WHERE queue_recipients.queue_id = r_queue_ids[i] AND address = r_addresses[i];
    END LOOP;

    -- Two workers finishing two rows of one message at once: the second waits here for the
    -- first, and its next statement sees the first's rows as they are now, so that one of
    -- them finds the message done.
    PERFORM 1 FROM outbound_messages
    WHERE id IN (SELECT message_id FROM queue WHERE id = ANY(held))
    ORDER BY id FOR NO KEY UPDATE;

    RETURN QUERY
    WITH counts AS (
        SELECT h.id AS queue_id, c.pending, c.bounced
        FROM unnest(held) AS h (id) CROSS JOIN LATERAL (
            SELECT count(*) FILTER (WHERE r.status IN ('queued', 'deferred')) AS pending,
                   count(*) FILTER (WHERE r.status = 'bounced') AS bounced
            FROM queue_recipients r WHERE r.queue_id = h.id
        ) c
    ),
    updated AS (
        UPDATE queue AS q
        SET status = CASE WHEN c.pending > 0 THEN 'queued'
                          WHEN c.bounced > 0 THEN 'bounced' ELSE 'sent' END,
            lease_owner = NULL, lease_expires_at = NULL,
            next_attempt_at = CASE WHEN c.pending > 0
                THEN p_now + make_interval(secs => u.wait) ELSE q.next_attempt_at END,
            last_error = u.error, updated_at = now()
        FROM unnest(p_ids, p_waits, p_errors) AS u (id, wait, error), counts c
        WHERE q.id = u.id AND c.queue_id = u.id
        RETURNING q.id, q.status, q.message_id
    )
    SELECT u.id, u.status, NOT EXISTS (
        SELECT 1 FROM queue o WHERE o.message_id = u.message_id AND o.id <> ALL(held)
          AND o.status IN ('queued', 'delivering')
    ) AND u.status <> 'queued' AND NOT EXISTS (
        SELECT 1 FROM updated w WHERE w.message_id = u.message_id AND w.status = 'queued'
    )
    FROM updated u;
END;
$$;
