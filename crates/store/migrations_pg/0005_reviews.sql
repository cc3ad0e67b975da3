-- The validation queue (arches_core::review): one row per item. The whole item is kept as
-- JSON in `body`; the columns beside it are what listings filter and sort by, and what
-- calibration reads. `claimed_by`/`claim_expires_at` are written only by claims, never by
-- the engine's commits, and a decided item is never overwritten.
CREATE TABLE review_items (
    id                uuid              NOT NULL PRIMARY KEY,
    org_id            uuid              NOT NULL,
    run_id            uuid              NOT NULL,
    task_run_id       uuid              NOT NULL,
    pipeline_name     text              NOT NULL,
    task_id           text              NOT NULL,
    tool              text              NOT NULL,
    kind              text              NOT NULL,
    state             text              NOT NULL,
    confidence        double precision,
    -- 1: approved as proposed; 0: edited or rejected; NULL: not feedback (yet).
    feedback          smallint,
    weight            double precision  NOT NULL,
    created_at        bigint            NOT NULL,
    decided_at        bigint,
    claimed_by        text,
    claim_expires_at  bigint,
    body              jsonb             NOT NULL
);

CREATE INDEX review_items_by_org_state ON review_items (org_id, state, id);
CREATE INDEX review_items_by_run ON review_items (run_id);
CREATE INDEX review_items_feedback ON review_items (org_id, pipeline_name, task_id, decided_at)
    WHERE feedback IS NOT NULL;
