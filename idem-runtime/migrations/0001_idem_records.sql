-- idem schema version 1: the idempotency records.
--
-- Applied by `PostgresStore::migrate` in one transaction under idem's migration lock, and
-- recorded in `idem_schema_migrations` with the SHA-256 of this file. Never edit a migration
-- once released: add the next file (0002_...) instead.
--
-- One row per scoped Idempotency-Key. A row moves through the states of idem's state machine:
--
--   in_flight  an attempt holds the lease until lease_deadline and may run the handler;
--   released   the attempt gave up early: its lease has ended, the row keeps the epoch and the
--              fingerprint, and the next acquire takes over with epoch + 1;
--   completed  the result is recorded and replayed to every duplicate until expires_at.
--
-- Times are on the database's clock. Expired rows are deleted in bounded batches by
-- `PostgresStore::purge_expired` through the index on expires_at.

CREATE TABLE idem_records (
    -- SHA-256 of the scope and the client's key (idem's RecordKey); client bytes never get here.
    key            bytea       NOT NULL,
    -- 'in_flight', 'released' or 'completed' (see above).
    state          text        NOT NULL,
    -- The owner token of the attempt that holds (or completed) the record: 16 bytes, big-endian.
    owner_token    bytea       NOT NULL,
    -- How many attempts have owned the record, 1 for the first: the handlers' fencing number.
    epoch          bigint      NOT NULL,
    -- SHA-256 of the request the key was first used with; another request gets 422.
    fingerprint    bytea       NOT NULL,
    -- When the lease ends (in_flight) or ended (released); NULL once completed.
    lease_deadline timestamptz,
    -- When the row may be purged: the route's ttl after completion, its retention before.
    expires_at     timestamptz NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- When the result was recorded; NULL until completed.
    completed_at   timestamptz,
    -- The recorded result in idem's binary encoding (RecordedResult::encode); NULL until
    -- completed.
    result         bytea,

    CONSTRAINT idem_records_pkey PRIMARY KEY (key),
    CONSTRAINT idem_records_key_length CHECK (octet_length(key) = 32),
    CONSTRAINT idem_records_state CHECK (state IN ('in_flight', 'released', 'completed')),
    CONSTRAINT idem_records_owner_token_length CHECK (octet_length(owner_token) = 16),
    CONSTRAINT idem_records_epoch_positive CHECK (epoch >= 1),
    CONSTRAINT idem_records_fingerprint_length CHECK (octet_length(fingerprint) = 32),
    -- A lease exactly while not completed; a result and its time exactly once completed.
    CONSTRAINT idem_records_lease_until_completed
        CHECK ((state = 'completed') = (lease_deadline IS NULL)),
    CONSTRAINT idem_records_result_once_completed
        CHECK ((state = 'completed') = (result IS NOT NULL)),
    CONSTRAINT idem_records_completed_at_once_completed
        CHECK ((state = 'completed') = (completed_at IS NOT NULL)),
    -- The purge never removes a row whose lease is still running.
    CONSTRAINT idem_records_expires_after_lease
        CHECK (lease_deadline IS NULL OR expires_at >= lease_deadline)
);

COMMENT ON TABLE idem_records IS
    'idem idempotency records, one per scoped Idempotency-Key (see idem-runtime store::PostgresStore)';

-- The purge's scan: oldest expiry first, a bounded batch at a time.
CREATE INDEX idem_records_expires_at ON idem_records (expires_at);
