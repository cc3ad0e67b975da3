-- Identity: organizations, users, their memberships of organizations, login sessions with
-- their refresh tokens, API keys, one-time tokens, recovery codes, invitations and the audit
-- trail. The tables of the SQLite store's 0002_orgs.sql (`orgs`) and 0003_identity.sql, in
-- PostgreSQL's native types with the conventions of 0001_initial.sql (uuid ids, bigint
-- microseconds, jsonb).
--
-- Secrets are never stored: passwords are Argon2id PHC strings, and every token, key and
-- code is kept as the hex SHA-256 digest of its random value. Roles, token purposes and
-- audit outcomes are their stable names.
--
-- The `org_id` columns of pipelines, runs, artifacts, tools and secrets (0001, 0002) still
-- carry no foreign key to `orgs`, as in SQLite: the storage port of runs does not depend on
-- the identity port, and the API checks the org before it writes.

-- A single-tenant installation uses the default org created here; its id is fixed
-- (`OrgId::DEFAULT`) so the CLI and the server agree without a lookup.
CREATE TABLE orgs (
    id          uuid    NOT NULL PRIMARY KEY,
    slug        text    NOT NULL UNIQUE,
    name        text    NOT NULL,
    created_at  bigint  NOT NULL
);

INSERT INTO orgs (id, slug, name, created_at)
VALUES ('00000000-0000-0000-0000-000000000001', 'default', 'Default',
        (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);

CREATE TABLE users (
    id                 uuid    NOT NULL PRIMARY KEY,
    -- Trimmed and lowercased by the caller, so the uniqueness holds for what users type.
    email              text    NOT NULL UNIQUE,
    display_name       text    NOT NULL,
    password_hash      text    NOT NULL,
    email_verified_at  bigint,
    totp_secret        text,
    totp_enabled_at    bigint,
    -- The last RFC 6238 time step accepted; a code of this step or an earlier one is a replay.
    totp_last_step     bigint,
    created_at         bigint  NOT NULL,
    disabled_at        bigint
);

CREATE TABLE memberships (
    org_id      uuid    NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    user_id     uuid    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role        text    NOT NULL CHECK (role IN ('viewer', 'editor', 'admin', 'owner')),
    created_at  bigint  NOT NULL,
    PRIMARY KEY (org_id, user_id)
);

-- The orgs of a user; the primary key serves the members of an org.
CREATE INDEX memberships_by_user ON memberships (user_id, org_id);

-- A session is one refresh-token family on one device. It never outlives `expires_at`,
-- however often it is refreshed.
CREATE TABLE sessions (
    id              uuid    NOT NULL PRIMARY KEY,
    user_id         uuid    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    org_id          uuid    NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    user_agent      text,
    ip              text,
    last_ip         text,
    created_at      bigint  NOT NULL,
    last_seen_at    bigint  NOT NULL,
    expires_at      bigint  NOT NULL,
    revoked_at      bigint,
    revoked_reason  text
);

CREATE INDEX sessions_by_user ON sessions (user_id, created_at DESC, id DESC);
CREATE INDEX sessions_by_org ON sessions (org_id, user_id);

-- Every token a family was ever given: a used one presented again is a reuse, which revokes
-- the whole family.
CREATE TABLE refresh_tokens (
    hash        text    NOT NULL PRIMARY KEY,
    session_id  uuid    NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    created_at  bigint  NOT NULL,
    used_at     bigint
);

CREATE INDEX refresh_tokens_by_session ON refresh_tokens (session_id);

CREATE TABLE api_keys (
    id            uuid    NOT NULL PRIMARY KEY,
    user_id       uuid    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    org_id        uuid    NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    name          text    NOT NULL,
    role          text    NOT NULL CHECK (role IN ('viewer', 'editor', 'admin', 'owner')),
    hash          text    NOT NULL UNIQUE,
    created_at    bigint  NOT NULL,
    expires_at    bigint,
    last_used_at  bigint,
    revoked_at    bigint
);

CREATE INDEX api_keys_by_user ON api_keys (user_id, created_at DESC, id DESC);
CREATE INDEX api_keys_by_org ON api_keys (org_id, user_id);

-- Email verification, password reset and MFA challenge tokens, each usable once.
CREATE TABLE one_time_tokens (
    hash        text    NOT NULL PRIMARY KEY,
    user_id     uuid    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    purpose     text    NOT NULL,
    created_at  bigint  NOT NULL,
    expires_at  bigint  NOT NULL,
    used_at     bigint
);

CREATE INDEX one_time_tokens_by_user ON one_time_tokens (user_id);

-- TOTP recovery codes; a set is replaced whole when the user asks for new codes.
CREATE TABLE recovery_codes (
    user_id  uuid    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    hash     text    NOT NULL,
    used_at  bigint,
    PRIMARY KEY (user_id, hash)
);

CREATE TABLE invitations (
    id           uuid    NOT NULL PRIMARY KEY,
    org_id       uuid    NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    email        text    NOT NULL,
    role         text    NOT NULL CHECK (role IN ('viewer', 'editor', 'admin', 'owner')),
    token_hash   text    NOT NULL UNIQUE,
    invited_by   uuid    NOT NULL REFERENCES users (id),
    created_at   bigint  NOT NULL,
    expires_at   bigint  NOT NULL,
    accepted_at  bigint,
    accepted_by  uuid    REFERENCES users (id),
    revoked_at   bigint
);

CREATE INDEX invitations_by_org ON invitations (org_id, created_at DESC, id DESC);

-- The audit trail, append-only. It has no foreign keys on purpose: the record of what
-- happened outlives the org, user or key it names. `seq`, the paging cursor, comes from an
-- identity sequence, which never hands a number out twice; appends are serialized by an
-- advisory lock (see `append_audit`) so that events become visible in `seq` order.
CREATE TABLE audit_events (
    seq               bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id            uuid,
    actor_user_id     uuid,
    actor_api_key_id  uuid,
    action            text    NOT NULL,
    target_kind       text,
    target_id         text,
    at                bigint  NOT NULL,
    ip                text,
    request_id        text,
    outcome           text    NOT NULL,
    status            integer,
    -- A JSON value (an object in practice); never secrets. The JSON `null` is a value here.
    details           jsonb   NOT NULL
);

CREATE INDEX audit_events_by_org ON audit_events (org_id, seq DESC);
CREATE INDEX audit_events_by_actor ON audit_events (actor_user_id, seq);
