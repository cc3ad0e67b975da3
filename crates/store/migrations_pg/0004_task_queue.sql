-- The shared task queue of standalone workers (`arches worker`); see `TaskQueue` in
-- arches-core and `postgres/queue.rs`. Timestamps are BIGINT microseconds, as elsewhere.

-- One row per task run a scheduler has leased and offered; deleted by the completion that
-- reports it (or by the scheduler when the run is cancelled). `claim` is the claim's own
-- fencing token: it grows with every claim and every hand-back, so the late completion of a
-- worker whose claim expired or was handed back matches no row.
CREATE TABLE task_queue (
    task_run_id       uuid    NOT NULL PRIMARY KEY REFERENCES task_runs (id) ON DELETE CASCADE,
    run_id            uuid    NOT NULL,
    org_id            uuid    NOT NULL,
    fencing_token     bigint  NOT NULL,
    owner             text    NOT NULL,
    worker_tags       text[]  NOT NULL DEFAULT '{}',
    assignment        jsonb   NOT NULL,
    offered_at        bigint  NOT NULL,
    claimed_by        text,
    claim             bigint  NOT NULL DEFAULT 0,
    claim_expires_at  bigint,
    -- Claims that expired and were taken over (a worker killed or stopped while it held
    -- the offer); a worker fails the task instead of running it once this reaches its bound.
    expiries          bigint  NOT NULL DEFAULT 0
);

-- Claims take the oldest unclaimed offers first (an index of those only, so a claim never
-- walks past the offers other workers hold); the expiry index serves the take-over of
-- expired claims and the next expiry an idle worker sleeps until.
CREATE INDEX task_queue_unclaimed ON task_queue (offered_at, task_run_id) WHERE claimed_by IS NULL;
CREATE INDEX task_queue_by_claim_expiry ON task_queue (claim_expires_at) WHERE claimed_by IS NOT NULL;

-- Completions reported by workers, waiting for the scheduler that owns the run; deleted in
-- the commit that applies them.
CREATE TABLE task_completions (
    seq            bigserial  NOT NULL PRIMARY KEY,
    task_run_id    uuid       NOT NULL,
    run_id         uuid       NOT NULL,
    owner          text       NOT NULL,
    fencing_token  bigint     NOT NULL,
    worker         text       NOT NULL,
    claims         bigint     NOT NULL,
    outcome        jsonb      NOT NULL,
    executed_at    bigint     NOT NULL,
    finished_at    bigint     NOT NULL,
    taken          boolean    NOT NULL DEFAULT false
);

CREATE INDEX task_completions_by_owner ON task_completions (owner, seq) WHERE NOT taken;
CREATE INDEX task_completions_by_task_run ON task_completions (task_run_id, fencing_token);
