-- The schema of the PostgreSQL store: the same tables as the SQLite store's migrations
-- (0001_initial.sql and 0002_orgs.sql there), in PostgreSQL's native types.
--
-- Conventions: ids are `uuid`; states are their stable names; timestamps are BIGINT
-- microseconds since the Unix epoch, as `Timestamp` holds them (no time zone or precision
-- conversion on the way in or out); JSON values are `jsonb`, where SQL NULL is `None` and the
-- JSON `null` is `Some(Value::Null)`; every unsigned 32-bit count is a BIGINT so it fits
-- whole. Names that listings sort by are `COLLATE "C"`, so they sort by bytes as in SQLite,
-- whatever the database's default collation.
--
-- The org tables belong to the identity store, which is not ported yet; `org_id` columns carry
-- no foreign key, as in SQLite.

CREATE TABLE pipelines (
    org_id      uuid    NOT NULL,
    name        text    COLLATE "C" NOT NULL,
    version     bigint  NOT NULL,
    digest      text    NOT NULL,
    definition  jsonb   NOT NULL,
    created_at  bigint  NOT NULL,
    PRIMARY KEY (org_id, name, version),
    UNIQUE (org_id, name, digest)
);

-- One row per archived pipeline name; un-archiving deletes it.
CREATE TABLE pipeline_archive (
    org_id       uuid    NOT NULL,
    name         text    COLLATE "C" NOT NULL,
    archived_at  bigint  NOT NULL,
    PRIMARY KEY (org_id, name)
);

CREATE TABLE runs (
    id                uuid    NOT NULL PRIMARY KEY,
    org_id            uuid    NOT NULL,
    pipeline_name     text    COLLATE "C" NOT NULL,
    pipeline_version  bigint  NOT NULL,
    params            jsonb   NOT NULL,
    state             text    NOT NULL,
    error             text,
    owner             text,
    created_at        bigint  NOT NULL,
    started_at        bigint,
    finished_at       bigint
);

CREATE INDEX runs_by_org_created ON runs (org_id, created_at DESC, id DESC);
CREATE INDEX runs_by_org_pipeline ON runs (org_id, pipeline_name, id DESC);

CREATE TABLE task_runs (
    id                uuid    NOT NULL PRIMARY KEY,
    run_id            uuid    NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    task_id           text    NOT NULL,
    item_index        bigint,
    fan_out           bigint,
    state             text    NOT NULL,
    attempt           bigint  NOT NULL,
    lease_expiries    bigint  NOT NULL,
    fencing_token     bigint  NOT NULL,
    item              jsonb,
    inputs            jsonb,
    outputs           jsonb,
    error             text,
    lease_owner       text,
    lease_expires_at  bigint,
    ready_at          bigint,
    created_at        bigint  NOT NULL,
    queued_at         bigint,
    started_at        bigint,
    finished_at       bigint
);

CREATE INDEX task_runs_by_run ON task_runs (run_id, created_at, id);

CREATE TABLE attempts (
    task_run_id    uuid    NOT NULL REFERENCES task_runs (id) ON DELETE CASCADE,
    attempt        bigint  NOT NULL,
    run_id         uuid    NOT NULL,
    fencing_token  bigint  NOT NULL,
    worker         text    NOT NULL,
    state          text    NOT NULL,
    started_at     bigint  NOT NULL,
    finished_at    bigint,
    error          text,
    PRIMARY KEY (task_run_id, attempt)
);

CREATE INDEX attempts_by_run ON attempts (run_id, task_run_id, attempt);

-- Log lines carry no foreign key: the log writer runs beside the commit path and must never
-- lose a line because its task run's row is not committed yet. `seq` comes from an identity
-- sequence; appends are serialized by an advisory lock (see `append_logs`) so that lines
-- become visible in `seq` order and a reader paging by `seq` never skips one.
CREATE TABLE logs (
    seq          bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id       uuid    NOT NULL,
    task_run_id  uuid    NOT NULL,
    task_id      text,
    attempt      bigint  NOT NULL,
    stream       text    NOT NULL,
    at           bigint  NOT NULL,
    text         text    NOT NULL
);

CREATE INDEX logs_by_run ON logs (run_id, seq);

-- Artifacts outlive the runs that produced them, so `produced_by` is plain columns.
CREATE TABLE artifacts (
    id           uuid    NOT NULL PRIMARY KEY,
    org_id       uuid    NOT NULL,
    name         text    COLLATE "C" NOT NULL,
    version      bigint  NOT NULL,
    digest       text    NOT NULL,
    size_bytes   bigint  NOT NULL,
    media_type   text    NOT NULL,
    table_meta   jsonb,
    run_id       uuid,
    task_run_id  uuid,
    task_id      text,
    attempt      bigint,
    inputs       jsonb   NOT NULL,
    created_at   bigint  NOT NULL,
    UNIQUE (org_id, name, version)
);

CREATE INDEX artifacts_by_run ON artifacts (run_id);
CREATE INDEX artifacts_by_org_created ON artifacts (org_id, created_at DESC, id DESC);
