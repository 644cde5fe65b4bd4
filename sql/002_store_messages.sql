-- Group commit of deliveries: the messages that arrived while the previous batch was being
-- written are recorded by one call, in one transaction (one WAL flush, one round trip).
--
-- batch: a JSON array of jobs; a job is a JSON array of messages (one per mailbox that receives
-- the same delivery); a message is an object with the keys named in jsonb_to_recordset below.
-- A job is all or nothing: every message of it is stored, or none (over quota, or a mailbox
-- that no longer exists), without affecting the other jobs of the batch.
--
-- Returns one row per message, in order: the job's index (from 0), 'stored' with the mailbox,
-- UID and MODSEQ given, or 'over_quota' / 'no_mailbox' with NULLs.
CREATE FUNCTION esp_store_messages(batch jsonb)
RETURNS TABLE (job integer, status text, mailbox_id bigint, uid bigint, modseq bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    j record;
    m record;
    stored_mailbox bigint;
    stored_uid bigint;
    stored_modseq bigint;
    mailboxes_ bigint[];
    uids bigint[];
    modseqs bigint[];
    outcome text;
BEGIN
    FOR j IN SELECT value AS records, (ordinality - 1)::integer AS n
             FROM jsonb_array_elements(batch) WITH ORDINALITY LOOP
        mailboxes_ := '{}';
        uids := '{}';
        modseqs := '{}';
        BEGIN
            FOR m IN SELECT * FROM jsonb_to_recordset(j.records) AS r(
                    user_id bigint, mailbox_id bigint, mailbox text, enforce boolean,
                    filename text, size bigint, internal_date timestamptz, seen boolean,
                    answered boolean, flagged boolean, deleted boolean, draft boolean,
                    keywords text[], envelope_from text,
                    envelope_to text[], message_id text, in_reply_to text, subject text,
                    from_header text, to_header text, cc_header text, bcc_header text,
                    sent_date timestamptz, headers text) LOOP
                UPDATE users AS u
                SET used_bytes = u.used_bytes + m.size, used_messages = u.used_messages + 1
                WHERE u.id = m.user_id AND (NOT m.enforce OR (
                    (u.quota_bytes IS NULL OR u.used_bytes + m.size <= u.quota_bytes)
                    AND (u.quota_messages IS NULL OR u.used_messages + 1 <= u.quota_messages)));
                IF NOT FOUND THEN
                    IF EXISTS (SELECT 1 FROM users AS u WHERE u.id = m.user_id) THEN
                        RAISE EXCEPTION 'over quota' USING ERRCODE = 'ES001';
                    END IF;
                    RAISE EXCEPTION 'no such user' USING ERRCODE = 'ES002';
                END IF;
                -- The row lock taken here serialises UID allocation per mailbox until commit.
                UPDATE mailboxes AS b
                SET uidnext = b.uidnext + 1, highestmodseq = b.highestmodseq + 1,
                    message_count = b.message_count + 1,
                    unseen_count = b.unseen_count + CASE WHEN m.seen THEN 0 ELSE 1 END,
                    total_bytes = b.total_bytes + m.size
                WHERE b.user_id = m.user_id AND (b.id = m.mailbox_id OR b.name = m.mailbox)
                RETURNING b.id, b.uidnext - 1, b.highestmodseq
                INTO stored_mailbox, stored_uid, stored_modseq;
                IF NOT FOUND THEN
                    RAISE EXCEPTION 'no such mailbox' USING ERRCODE = 'ES002';
                END IF;
                INSERT INTO messages (
                    mailbox_id, uid, modseq, filename, size, internal_date, seen, answered,
                    flagged, deleted, draft, keywords, envelope_from, envelope_to, message_id,
                    in_reply_to,
                    subject, from_header, to_header, cc_header, bcc_header, sent_date, headers)
                VALUES (
                    stored_mailbox, stored_uid, stored_modseq, m.filename, m.size,
                    m.internal_date, coalesce(m.seen, false), coalesce(m.answered, false),
                    coalesce(m.flagged, false), coalesce(m.deleted, false),
                    coalesce(m.draft, false), coalesce(m.keywords, '{}'),
                    m.envelope_from, coalesce(m.envelope_to, '{}'), m.message_id,
                    m.in_reply_to, m.subject, m.from_header, m.to_header, m.cc_header,
                    m.bcc_header, m.sent_date, m.headers);
                -- Sent at commit (and dropped with a rolled-back job): IDLE sessions on every
                -- node learn of the new message.
                PERFORM pg_notify('esp_mailbox',
                                  stored_mailbox || ':' || stored_uid || ':' || stored_modseq);
                mailboxes_ := mailboxes_ || stored_mailbox;
                uids := uids || stored_uid;
                modseqs := modseqs || stored_modseq;
            END LOOP;
            outcome := 'stored';
        EXCEPTION
            WHEN SQLSTATE 'ES001' THEN outcome := 'over_quota';
            WHEN SQLSTATE 'ES002' THEN outcome := 'no_mailbox';
        END;
        IF outcome = 'stored' THEN
            RETURN QUERY SELECT j.n, outcome, s.b, s.u, s.m
                         FROM unnest(mailboxes_, uids, modseqs) AS s(b, u, m);
        ELSE
            RETURN QUERY SELECT j.n, outcome, NULL::bigint, NULL::bigint, NULL::bigint
                         FROM jsonb_array_elements(j.records);
        END IF;
    END LOOP;
END
$$;
