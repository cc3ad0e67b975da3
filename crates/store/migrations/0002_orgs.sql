-- Organizations: every pipeline, run and artifact belongs to one. A single-tenant
-- installation uses the default org created here; its id is fixed (`OrgId::DEFAULT`) so the
-- CLI and the server agree without a lookup. Rows written before this migration move to it.
-- The `org_id` columns of pipelines, runs and artifacts carry no foreign key: the storage
-- port of runs does not depend on the identity port, and the API checks the org before it
-- writes.

CREATE TABLE orgs (
    id          TEXT    NOT NULL PRIMARY KEY,
    slug        TEXT    NOT NULL UNIQUE,
    name        TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;

INSERT INTO orgs (id, slug, name, created_at)
VALUES ('00000000-0000-0000-0000-000000000001', 'default', 'Default',
        CAST(unixepoch('subsec') * 1000000 AS INTEGER));

-- Pipelines are named per org, and can be archived (hidden from lists, no new runs).
CREATE TABLE pipelines_by_org (
    org_id      TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    digest      TEXT    NOT NULL,
    definition  TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (org_id, name, version),
    UNIQUE (org_id, name, digest)
) STRICT;

INSERT INTO pipelines_by_org (org_id, name, version, digest, definition, created_at)
SELECT '00000000-0000-0000-0000-000000000001', name, version, digest, definition, created_at
FROM pipelines;

DROP TABLE pipelines;
ALTER TABLE pipelines_by_org RENAME TO pipelines;

-- One row per archived pipeline name; un-archiving deletes it.
CREATE TABLE pipeline_archive (
    org_id       TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    archived_at  INTEGER NOT NULL,
    PRIMARY KEY (org_id, name)
) STRICT;

ALTER TABLE runs ADD COLUMN org_id TEXT NOT NULL
    DEFAULT '00000000-0000-0000-0000-000000000001';

DROP INDEX runs_by_created;
DROP INDEX runs_by_pipeline;
CREATE INDEX runs_by_org_created ON runs (org_id, created_at DESC, id DESC);
CREATE INDEX runs_by_org_pipeline ON runs (org_id, pipeline_name, id DESC);

-- Artifact names are versioned per org.
CREATE TABLE artifacts_by_org (
    id           TEXT    NOT NULL PRIMARY KEY,
    org_id       TEXT    NOT NULL,
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
    UNIQUE (org_id, name, version)
) STRICT;

INSERT INTO artifacts_by_org (id, org_id, name, version, digest, size_bytes, media_type,
                              table_meta, run_id, task_run_id, task_id, attempt, inputs,
                              created_at)
SELECT id, '00000000-0000-0000-0000-000000000001', name, version, digest, size_bytes,
       media_type, table_meta, run_id, task_run_id, task_id, attempt, inputs, created_at
FROM artifacts;

DROP TABLE artifacts;
ALTER TABLE artifacts_by_org RENAME TO artifacts;
CREATE INDEX artifacts_by_run ON artifacts (run_id);
CREATE INDEX artifacts_by_org_created ON artifacts (org_id, created_at DESC, id DESC);
