-- The initial schema of the embedded store.
--
-- Conventions: ids are UUID text (lowercase, hyphenated; UUIDv7, so they sort by creation
-- time), states are their stable names, timestamps are INTEGER microseconds since the Unix
-- epoch, JSON values are TEXT. Tables are STRICT so a wrong type is refused, not coerced.

CREATE TABLE pipelines (
    name        TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    digest      TEXT    NOT NULL,
    definition  TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (name, version),
    UNIQUE (name, digest)
) STRICT;

CREATE TABLE runs (
    id                TEXT    NOT NULL PRIMARY KEY,
    pipeline_name     TEXT    NOT NULL,
    pipeline_version  INTEGER NOT NULL,
    params            TEXT    NOT NULL,
    state             TEXT    NOT NULL,
    error             TEXT,
    owner             TEXT,
    created_at        INTEGER NOT NULL,
    started_at        INTEGER,
    finished_at       INTEGER
) STRICT;

CREATE INDEX runs_by_created ON runs (created_at DESC, id DESC);
CREATE INDEX runs_by_pipeline ON runs (pipeline_name, id DESC);

CREATE TABLE task_runs (
    id                TEXT    NOT NULL PRIMARY KEY,
    run_id            TEXT    NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    task_id           TEXT    NOT NULL,
    item_index        INTEGER,
    fan_out           INTEGER,
    state             TEXT    NOT NULL,
    attempt           INTEGER NOT NULL,
    lease_expiries    INTEGER NOT NULL,
    fencing_token     INTEGER NOT NULL,
    item              TEXT,
    inputs            TEXT,
    outputs           TEXT,
    error             TEXT,
    lease_owner       TEXT,
    lease_expires_at  INTEGER,
    ready_at          INTEGER,
    created_at        INTEGER NOT NULL,
    queued_at         INTEGER,
    started_at        INTEGER,
    finished_at       INTEGER
) STRICT, WITHOUT ROWID;

CREATE INDEX task_runs_by_run ON task_runs (run_id, created_at, id);

CREATE TABLE attempts (
    task_run_id    TEXT    NOT NULL REFERENCES task_runs (id) ON DELETE CASCADE,
    attempt        INTEGER NOT NULL,
    run_id         TEXT    NOT NULL,
    fencing_token  INTEGER NOT NULL,
    worker         TEXT    NOT NULL,
    state          TEXT    NOT NULL,
    started_at     INTEGER NOT NULL,
    finished_at    INTEGER,
    error          TEXT,
    PRIMARY KEY (task_run_id, attempt)
) STRICT, WITHOUT ROWID;

CREATE INDEX attempts_by_run ON attempts (run_id, task_run_id, attempt);

-- Log lines carry no foreign key: the log writer runs beside the commit path and must never
-- lose a line because its task run's row is not committed yet.
CREATE TABLE logs (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id       TEXT    NOT NULL,
    task_run_id  TEXT    NOT NULL,
    task_id      TEXT,
    attempt      INTEGER NOT NULL,
    stream       TEXT    NOT NULL,
    at           INTEGER NOT NULL,
    text         TEXT    NOT NULL
) STRICT;

CREATE INDEX logs_by_run ON logs (run_id, seq);

-- Artifacts outlive the runs that produced them, so `produced_by` is plain columns.
CREATE TABLE artifacts (
    id           TEXT    NOT NULL PRIMARY KEY,
    name         TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    digest       TEXT    NOT NULL,
    size_bytes   INTEGER NOT NULL,
    media_type   TEXT    NOT NULL,
    table_meta   TEXT,
    run_id       TEXT,
    task_run_id  TEXT,
    task_id      TEXT,
    attempt      INTEGER,
    inputs       TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    UNIQUE (name, version)
) STRICT;

CREATE INDEX artifacts_by_run ON artifacts (run_id);
