-- idem schema version 2: the state machine's four transitions as functions.
--
-- `PostgresStore` runs each transition as one call of one of these functions: one statement, one
-- round trip, atomic (a statement is), on the database's clock. Client bytes only ever arrive as
-- bound parameters. Each function is safe to run twice with the same arguments: a call that timed
-- out on the client may still have run.
--
-- Every function first sets `lock_timeout` for the rest of its transaction (`set_config(...,
-- true)`): a lock wait (an operator's `LOCK TABLE`, a row another transaction is changing) ends
-- after that long with SQLSTATE 55P03 instead of blocking. Outside a transaction block a call is
-- its own transaction, so nothing outlives it; `idem_acquire`, which also opens a transactional
-- claim inside the handler's transaction, puts the caller's setting back before it returns.
--
-- Times are `clock_timestamp()`, read once per call: a claim runs inside a transaction that may
-- have started earlier, so `now()` would be stale. Durations arrive in milliseconds.

-- Milliseconds in `span`, rounded, never negative.
CREATE FUNCTION idem_millis(span interval) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT greatest(0, round(extract(epoch FROM span) * 1000))::bigint $$;

-- acquire: who runs the handler.
--
-- outcome     epoch    left_ms                 result
-- 'execute'   yes      NULL                    NULL     the caller owns the record: run
-- 'completed' NULL     time the record lives   yes      replay `result`
-- 'mismatch'  NULL     NULL                    NULL     the key came with another request
-- 'in_flight' NULL     time the lease lasts    NULL     another attempt holds the record
--
-- Reads never lock: replays, mismatches, duplicates in flight and a retried acquire of the same
-- owner are answered from a plain read. Only a change locks, and never waits for a lock:
--
-- * a new record is inserted under a transaction-level advisory lock on the key, taken with
--   `pg_try_advisory_xact_lock`: every insert of a key holds it until its transaction ends, so a
--   second inserter (a duplicate racing the first, or arriving while a transactional claim that
--   inserted the record is still open) is told `in_flight` at once instead of waiting for the
--   first to commit;
-- * an existing record is taken over (released, lease ended, or past `expires_at`) under its row
--   lock, taken with `FOR UPDATE SKIP LOCKED`: a row another transaction holds is being changed
--   (taken over, completed, or claimed inside a handler's transaction), so the answer is
--   `in_flight` at once.
--
-- The lock found busy gives no lease to report; `left_ms` is then the caller's own lease.
CREATE FUNCTION idem_acquire(
    p_key bytea,
    p_owner bytea,
    p_fingerprint bytea,
    p_lease_ms bigint,
    p_retention_ms bigint,
    p_lock_timeout_ms bigint,
    OUT outcome text,
    OUT epoch bigint,
    OUT left_ms bigint,
    OUT result bytea
)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    caller_lock_timeout constant text := current_setting('lock_timeout');
    lease constant interval := p_lease_ms * interval '1 millisecond';
    -- An in-flight record lives for the route's retention, and at least as long as its lease.
    retention constant interval :=
        greatest(p_lease_ms, p_retention_ms) * interval '1 millisecond';
    locked boolean := false;
    present boolean;
    now_ts timestamptz;
    r_state text;
    r_owner bytea;
    r_epoch bigint;
    r_fingerprint bytea;
    r_lease_deadline timestamptz;
    r_expires_at timestamptz;
    r_result bytea;
BEGIN
    PERFORM set_config('lock_timeout', p_lock_timeout_ms::text, true);
    -- A few rounds at most: each one ends in an answer, or sees a row that changed since it read
    -- it and reads again.
    FOR attempt IN 1..4 LOOP
        IF locked THEN
            SELECT r.state, r.owner_token, r.epoch, r.fingerprint, r.lease_deadline, r.expires_at,
                   r.result
            INTO r_state, r_owner, r_epoch, r_fingerprint, r_lease_deadline, r_expires_at,
                 r_result
            FROM idem_records AS r WHERE r.key = p_key FOR UPDATE SKIP LOCKED;
            IF NOT FOUND THEN
                -- Held by another transaction changing it right now (or deleted by the purge).
                outcome := 'in_flight';
                left_ms := p_lease_ms;
                EXIT;
            END IF;
        ELSE
            SELECT r.state, r.owner_token, r.epoch, r.fingerprint, r.lease_deadline, r.expires_at,
                   r.result
            INTO r_state, r_owner, r_epoch, r_fingerprint, r_lease_deadline, r_expires_at,
                 r_result
            FROM idem_records AS r WHERE r.key = p_key;
        END IF;
        present := FOUND;
        now_ts := clock_timestamp();

        IF NOT present THEN
            -- Absent: insert, under the key's advisory lock.
            IF NOT pg_try_advisory_xact_lock(
                ('x' || encode(substring(p_key FROM 1 FOR 8), 'hex'))::bit(64)::bigint
            ) THEN
                outcome := 'in_flight';
                left_ms := p_lease_ms;
                EXIT;
            END IF;
            INSERT INTO idem_records AS r
                (key, state, owner_token, epoch, fingerprint, lease_deadline, expires_at,
                 created_at)
            VALUES (p_key, 'in_flight', p_owner, 1, p_fingerprint, now_ts + lease,
                    now_ts + retention, now_ts)
            ON CONFLICT (key) DO NOTHING;
            IF FOUND THEN
                outcome := 'execute';
                epoch := 1;
                EXIT;
            END IF;
            -- Inserted and committed by another transaction since the read: read again.
            CONTINUE;
        END IF;

        IF r_expires_at <= now_ts THEN
            -- Past its expiry: as if absent, a new record with epoch 1.
            IF NOT locked THEN
                locked := true;
                CONTINUE;
            END IF;
            UPDATE idem_records AS r
            SET state = 'in_flight', owner_token = p_owner, epoch = 1,
                fingerprint = p_fingerprint, lease_deadline = now_ts + lease,
                expires_at = now_ts + retention, created_at = now_ts, completed_at = NULL,
                result = NULL
            WHERE r.key = p_key;
            outcome := 'execute';
            epoch := 1;
            EXIT;
        END IF;

        IF r_fingerprint <> p_fingerprint THEN
            outcome := 'mismatch';
            EXIT;
        END IF;

        IF r_state = 'completed' THEN
            outcome := 'completed';
            left_ms := idem_millis(r_expires_at - now_ts);
            result := r_result;
            EXIT;
        END IF;

        IF r_state = 'in_flight' AND r_owner = p_owner THEN
            -- The same owner again: a retried call converges.
            outcome := 'execute';
            epoch := r_epoch;
            EXIT;
        END IF;

        IF r_state = 'in_flight' AND r_lease_deadline > now_ts THEN
            outcome := 'in_flight';
            left_ms := idem_millis(r_lease_deadline - now_ts);
            EXIT;
        END IF;

        -- Released, or the owner's lease ended: take over with the next epoch.
        IF NOT locked THEN
            locked := true;
            CONTINUE;
        END IF;
        UPDATE idem_records AS r
        SET state = 'in_flight', owner_token = p_owner, epoch = r_epoch + 1,
            lease_deadline = now_ts + lease, expires_at = greatest(r_expires_at, now_ts + lease)
        WHERE r.key = p_key;
        outcome := 'execute';
        epoch := r_epoch + 1;
        EXIT;
    END LOOP;

    IF outcome IS NULL THEN
        RAISE EXCEPTION 'idem_acquire: the record of this key kept changing; try again'
            USING ERRCODE = 'serialization_failure';
    END IF;
    PERFORM set_config('lock_timeout', caller_lock_timeout, true);
END
$$;

-- renew: extends the lease from now, if the caller still owns the record in flight. True when
-- renewed. A record never expires before its lease ends.
CREATE FUNCTION idem_renew(
    p_key bytea,
    p_owner bytea,
    p_lease_ms bigint,
    p_lock_timeout_ms bigint
) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    now_ts constant timestamptz := clock_timestamp();
    deadline constant timestamptz := now_ts + p_lease_ms * interval '1 millisecond';
BEGIN
    PERFORM set_config('lock_timeout', p_lock_timeout_ms::text, true);
    UPDATE idem_records AS r
    SET lease_deadline = deadline, expires_at = greatest(r.expires_at, deadline)
    WHERE r.key = p_key AND r.owner_token = p_owner AND r.state = 'in_flight'
      AND r.expires_at > now_ts;
    RETURN FOUND;
END
$$;

-- complete: records the result if the caller still owns the record in flight, and keeps it for
-- the ttl from now. True when recorded, now or by an earlier run of the same call (the owner stays
-- in the record, so a repeated call converges); false when the caller is not the owner (taken
-- over, released, expired, or never acquired), and nothing changes.
CREATE FUNCTION idem_complete(
    p_key bytea,
    p_owner bytea,
    p_result bytea,
    p_ttl_ms bigint,
    p_lock_timeout_ms bigint
) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    now_ts constant timestamptz := clock_timestamp();
BEGIN
    PERFORM set_config('lock_timeout', p_lock_timeout_ms::text, true);
    UPDATE idem_records AS r
    SET state = 'completed', lease_deadline = NULL, completed_at = now_ts,
        expires_at = now_ts + p_ttl_ms * interval '1 millisecond', result = p_result
    WHERE r.key = p_key AND r.owner_token = p_owner AND r.state = 'in_flight'
      AND r.expires_at > now_ts;
    IF FOUND THEN
        RETURN true;
    END IF;
    RETURN EXISTS (
        SELECT FROM idem_records AS r
        WHERE r.key = p_key AND r.owner_token = p_owner AND r.state = 'completed'
          AND r.expires_at > now_ts
    );
END
$$;

-- release: ends the caller's lease now (state 'released'), keeping the record, its fingerprint
-- and its epoch, so the next acquire takes over with the next epoch. True when released; false
-- when the caller does not own the record in flight, and nothing changes.
CREATE FUNCTION idem_release(
    p_key bytea,
    p_owner bytea,
    p_lock_timeout_ms bigint
) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    now_ts constant timestamptz := clock_timestamp();
BEGIN
    PERFORM set_config('lock_timeout', p_lock_timeout_ms::text, true);
    UPDATE idem_records AS r
    SET state = 'released', lease_deadline = least(r.lease_deadline, now_ts)
    WHERE r.key = p_key AND r.owner_token = p_owner AND r.state = 'in_flight'
      AND r.expires_at > now_ts;
    RETURN FOUND;
END
$$;
