-- The validation queue (arches_core::review): one row per item. The whole item is kept as
-- JSON in `body`; the columns beside it are what listings filter and sort by, and what
-- calibration reads. `claimed_by`/`claim_expires_at` are written only by claims, never by
-- the engine's commits, and a decided item is never overwritten.
CREATE TABLE review_items (
    id                TEXT    NOT NULL PRIMARY KEY,
    org_id            TEXT    NOT NULL,
    run_id            TEXT    NOT NULL,
    task_run_id       TEXT    NOT NULL,
    pipeline_name     TEXT    NOT NULL,
    task_id           TEXT    NOT NULL,
    tool              TEXT    NOT NULL,
    kind              TEXT    NOT NULL,
    state             TEXT    NOT NULL,
    confidence        REAL,
    -- 1: approved as proposed; 0: edited or rejected; NULL: not feedback (yet).
    feedback          INTEGER,
    weight            REAL    NOT NULL,
    created_at        INTEGER NOT NULL,
    decided_at        INTEGER,
    claimed_by        TEXT,
    claim_expires_at  INTEGER,
    body              TEXT    NOT NULL
) STRICT;

CREATE INDEX review_items_by_org_state ON review_items (org_id, state, id);
CREATE INDEX review_items_by_run ON review_items (run_id);
CREATE INDEX review_items_feedback ON review_items (org_id, pipeline_name, task_id, decided_at)
    WHERE feedback IS NOT NULL;
