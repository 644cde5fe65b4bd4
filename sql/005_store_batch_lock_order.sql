-- esp_store_batch (003) locked users and mailboxes rows in the order its joins met them: two
-- worker processes recording batches for the same accounts in different orders could
-- deadlock (PostgreSQL then cancels one, which is recorded job by job).  Same function, with
-- the rows locked first in id order.

CREATE OR REPLACE FUNCTION esp_store_batch(batch jsonb)
RETURNS TABLE (job integer, status text, mailbox_id bigint, uid bigint, modseq bigint)
LANGUAGE plpgsql
-- The plans do not depend on the values (a JSON document's rows are never estimated): planning
-- these statements again at every call cost more than running them.
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    wanted bigint;
    placed bigint;
    fits bigint;
    users_ bigint;
    stored bigint;
    boxes bigint[];
    owners bigint[];
BEGIN
    -- Mailboxes are looked up one by one through (user_id, ...) indexes, whatever the
    -- planner thinks of a JSON document's size: never a scan of every user's mailboxes.
    SELECT count(*), count(b.id), array_agg(DISTINCT b.id) FILTER (WHERE b.id IS NOT NULL),
           array_agg(DISTINCT x.user_id)
    INTO wanted, placed, boxes, owners
    FROM jsonb_array_elements(batch) AS j(v),
         jsonb_to_recordset(j.v) AS x(user_id bigint, mailbox_id bigint, mailbox text)
         LEFT JOIN LATERAL (
            SELECT b.id FROM mailboxes AS b
            WHERE b.user_id = x.user_id AND (b.id = x.mailbox_id OR b.name = x.mailbox)
            LIMIT 1) AS b ON true;
    IF placed < wanted THEN
        RAISE EXCEPTION 'a mailbox of the batch does not exist' USING ERRCODE = 'ES002';
    END IF;
    -- The rows this batch will update, locked in one order (users, then mailboxes, each by
    -- id) whatever the order of its jobs: two processes recording batches for the same
    -- accounts at once cannot deadlock.  (UPDATE takes the same lock: no upgrade later.)
    PERFORM 1 FROM users AS u WHERE u.id = ANY(owners) ORDER BY u.id FOR NO KEY UPDATE;
    PERFORM 1 FROM mailboxes AS b WHERE b.id = ANY(boxes) ORDER BY b.id FOR NO KEY UPDATE;
    -- Quota per user for the whole batch: if the sum fits, each job in turn fits.
    WITH m AS (
        SELECT x.user_id, x.size, coalesce(x.enforce, false) AS enforce
        FROM jsonb_array_elements(batch) AS j(v),
             jsonb_to_recordset(j.v) AS x(user_id bigint, size bigint, enforce boolean)
    ), usage AS (
        SELECT m.user_id, sum(m.size) AS bytes, count(*) AS n, bool_or(m.enforce) AS enforce
        FROM m GROUP BY m.user_id
    ), charged AS (
        UPDATE users AS u
        SET used_bytes = u.used_bytes + usage.bytes, used_messages = u.used_messages + usage.n
        FROM usage
        WHERE u.id = usage.user_id AND (NOT usage.enforce OR (
            (u.quota_bytes IS NULL OR u.used_bytes + usage.bytes <= u.quota_bytes)
            AND (u.quota_messages IS NULL OR u.used_messages + usage.n <= u.quota_messages)))
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM usage), (SELECT count(*) FROM charged) INTO users_, fits;
    IF fits < users_ THEN
        RAISE EXCEPTION 'the batch does not fit the quotas' USING ERRCODE = 'ES001';
    END IF;
    RETURN QUERY
    WITH m AS (
        SELECT (j.n - 1)::integer AS job, e.k, x.*
        FROM jsonb_array_elements(batch) WITH ORDINALITY AS j(v, n),
             jsonb_array_elements(j.v) WITH ORDINALITY AS e(v, k),
             jsonb_to_record(e.v) AS x(
                user_id bigint, mailbox_id bigint, mailbox text,
                filename text, size bigint, internal_date timestamptz, seen boolean,
                answered boolean, flagged boolean, deleted boolean, draft boolean,
                keywords text[], envelope_from text,
                envelope_to text[], message_id text, in_reply_to text, subject text,
                from_header text, to_header text, cc_header text, bcc_header text,
                sent_date timestamptz, headers text)
    ), placed AS (
        SELECT m.*, b.id AS box
        FROM m CROSS JOIN LATERAL (
            SELECT b.id FROM mailboxes AS b
            WHERE b.user_id = m.user_id AND (b.id = m.mailbox_id OR b.name = m.mailbox)
            LIMIT 1) AS b
    ), per_box AS (
        SELECT p.box, count(*) AS n, sum(p.size) AS bytes,
               count(*) FILTER (WHERE NOT coalesce(p.seen, false)) AS unseen
        FROM placed AS p GROUP BY p.box
    ), counted AS (
        -- The row lock taken here serialises UID allocation per mailbox until commit.
        UPDATE mailboxes AS b
        SET uidnext = b.uidnext + c.n, highestmodseq = b.highestmodseq + c.n,
            message_count = b.message_count + c.n, unseen_count = b.unseen_count + c.unseen,
            total_bytes = b.total_bytes + c.bytes
        FROM per_box AS c
        WHERE b.id = c.box
        RETURNING b.id, b.uidnext - c.n AS first_uid, b.highestmodseq - c.n AS first_modseq,
                  b.uidnext - 1 AS last_uid, b.highestmodseq AS last_modseq
    ), numbered AS (
        SELECT p.*, c.first_uid + row_number() OVER w - 1 AS new_uid,
               c.first_modseq + row_number() OVER w AS new_modseq
        FROM placed AS p JOIN counted AS c ON c.id = p.box
        WINDOW w AS (PARTITION BY p.box ORDER BY p.job, p.k)
    ), inserted AS (
        INSERT INTO messages (
            mailbox_id, uid, modseq, filename, size, internal_date, seen, answered,
            flagged, deleted, draft, keywords, envelope_from, envelope_to, message_id,
            in_reply_to, subject, from_header, to_header, cc_header, bcc_header, sent_date,
            headers)
        SELECT n.box, n.new_uid, n.new_modseq, n.filename, n.size, n.internal_date,
               coalesce(n.seen, false), coalesce(n.answered, false),
               coalesce(n.flagged, false), coalesce(n.deleted, false),
               coalesce(n.draft, false), coalesce(n.keywords, '{}'), n.envelope_from,
               coalesce(n.envelope_to, '{}'), n.message_id, n.in_reply_to, n.subject,
               n.from_header, n.to_header, n.cc_header, n.bcc_header, n.sent_date, n.headers
        FROM numbered AS n
        RETURNING 1
    ), notified AS (
        -- One notice per mailbox (sent at commit): IDLE sessions on every node wake up.
        SELECT pg_notify('esp_mailbox', c.id || ':' || c.last_uid || ':' || c.last_modseq)
        FROM counted AS c
    )
    SELECT n.job, 'stored'::text, n.box, n.new_uid, n.new_modseq
    FROM numbered AS n
    -- A plain CTE runs only when read: this makes the notices go out.
    CROSS JOIN (SELECT count(*) FROM notified) AS sent
    ORDER BY n.job, n.k;
    GET DIAGNOSTICS stored = ROW_COUNT;
    IF stored < wanted THEN
        -- A mailbox went away since the first statement: job by job will say which.
        RAISE EXCEPTION 'a mailbox of the batch went away' USING ERRCODE = 'ES002';
    END IF;
END
$$;
