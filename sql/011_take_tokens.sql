-- The rate limiter's check-and-take in one round trip: the buckets of a message are found or
-- made and locked in the order given (callers sort the keys), refilled, and each gives a
-- token only when every one of them has one.  The commit does not wait for the WAL flush: a
-- count lost in a crash of PostgreSQL only lets a few more messages through, and the busiest
-- rows (one client's bucket) must not be held for a flush per message.
CREATE FUNCTION esp_take_tokens(keys text[], capacities double precision[],
                                rates double precision[])
RETURNS TABLE (key text, tokens double precision) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    n integer := coalesce(array_length(keys, 1), 0);
    state double precision[] := '{}';
    held double precision;
    elapsed double precision;
    enough boolean := true;
    stamp timestamptz := clock_timestamp();
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    FOR i IN 1 .. n LOOP
        INSERT INTO rate_buckets AS r (key, tokens) VALUES (keys[i], capacities[i])
            ON CONFLICT ON CONSTRAINT rate_buckets_pkey DO UPDATE SET key = excluded.key
            RETURNING r.tokens, extract(epoch FROM stamp - r.updated_at) INTO held, elapsed;
        state[i] := least(capacities[i], held + greatest(elapsed, 0) * rates[i]);
        IF state[i] < 1 THEN
            enough := false;
        END IF;
    END LOOP;
    FOR i IN 1 .. n LOOP
        UPDATE rate_buckets AS r SET tokens = state[i] - CASE WHEN enough THEN 1 ELSE 0 END,
                                     updated_at = stamp
            WHERE r.key = keys[i];
        key := keys[i];
        tokens := state[i];
        RETURN NEXT;
    END LOOP;
END
$$;
