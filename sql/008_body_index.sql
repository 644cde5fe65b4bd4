-- The full-text index of message bodies (messages.body_tsv, GIN-indexed since 001) is filled
-- after delivery, by the body indexer and by the first BODY/TEXT search of a mailbox; this
-- index finds the rows still waiting.  An empty tsvector marks a message that was indexed but
-- has no text (or whose file could not be read), so that it is not tried again and again.
CREATE INDEX messages_unindexed ON messages (mailbox_id, id) WHERE body_tsv IS NULL;

-- The query for IMAP SEARCH BODY/TEXT: the words of p_text, split by the same parser that
-- built the index, in order (<->), each matching a word or the start of one (:*).  NULL when
-- p_text has no words.  Lexemes are quoted for the tsquery input syntax (quotes and
-- backslashes doubled).
CREATE FUNCTION esp_body_query(p_text text) RETURNS tsquery
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT string_agg(
        '''' || replace(replace(l.lexeme, '\', '\\'), '''', '''''') || ''':*',
        ' <-> ' ORDER BY t.n, l.n
    )::tsquery
    FROM ts_debug('simple', p_text) WITH ORDINALITY
         AS t (alias, description, token, dictionaries, dictionary, lexemes, n)
    CROSS JOIN LATERAL unnest(t.lexemes) WITH ORDINALITY AS l (lexeme, n)
$$;
