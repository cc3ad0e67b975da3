-- Identity: users, their memberships of organizations, login sessions with their refresh
-- tokens, API keys, one-time tokens, recovery codes, invitations and the audit trail.
--
-- Secrets are never stored: passwords are Argon2id PHC strings, and every token, key and
-- code is kept as the hex SHA-256 digest of its random value. Roles, token purposes and
-- audit outcomes are their stable names. Conventions otherwise follow 0001_initial.sql.

CREATE TABLE users (
    id                 TEXT    NOT NULL PRIMARY KEY,
    -- Trimmed and lowercased by the caller, so the uniqueness holds for what users type.
    email              TEXT    NOT NULL UNIQUE,
    display_name       TEXT    NOT NULL,
    password_hash      TEXT    NOT NULL,
    email_verified_at  INTEGER,
    totp_secret        TEXT,
    totp_enabled_at    INTEGER,
    -- The last RFC 6238 time step accepted; a code of this step or an earlier one is a replay.
    totp_last_step     INTEGER,
    created_at         INTEGER NOT NULL,
    disabled_at        INTEGER
) STRICT;

CREATE TABLE memberships (
    org_id      TEXT    NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    user_id     TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role        TEXT    NOT NULL CHECK (role IN ('viewer', 'editor', 'admin', 'owner')),
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (org_id, user_id)
) STRICT, WITHOUT ROWID;

-- The orgs of a user; the primary key serves the members of an org.
CREATE INDEX memberships_by_user ON memberships (user_id, org_id);

-- A session is one refresh-token family on one device. It never outlives `expires_at`,
-- however often it is refreshed.
CREATE TABLE sessions (
    id              TEXT    NOT NULL PRIMARY KEY,
    user_id         TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    org_id          TEXT    NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    user_agent      TEXT,
    ip              TEXT,
    last_ip         TEXT,
    created_at      INTEGER NOT NULL,
    last_seen_at    INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    revoked_at      INTEGER,
    revoked_reason  TEXT
) STRICT;

CREATE INDEX sessions_by_user ON sessions (user_id, created_at DESC, id DESC);
CREATE INDEX sessions_by_org ON sessions (org_id, user_id);

-- Every token a family was ever given: a used one presented again is a reuse, which revokes
-- the whole family.
CREATE TABLE refresh_tokens (
    hash        TEXT    NOT NULL PRIMARY KEY,
    session_id  TEXT    NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    created_at  INTEGER NOT NULL,
    used_at     INTEGER
) STRICT, WITHOUT ROWID;

CREATE INDEX refresh_tokens_by_session ON refresh_tokens (session_id);

CREATE TABLE api_keys (
    id            TEXT    NOT NULL PRIMARY KEY,
    user_id       TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    org_id        TEXT    NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    name          TEXT    NOT NULL,
    role          TEXT    NOT NULL CHECK (role IN ('viewer', 'editor', 'admin', 'owner')),
    hash          TEXT    NOT NULL UNIQUE,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER,
    last_used_at  INTEGER,
    revoked_at    INTEGER
) STRICT;

CREATE INDEX api_keys_by_user ON api_keys (user_id, created_at DESC, id DESC);
CREATE INDEX api_keys_by_org ON api_keys (org_id, user_id);

-- Email verification, password reset and MFA challenge tokens, each usable once.
CREATE TABLE one_time_tokens (
    hash        TEXT    NOT NULL PRIMARY KEY,
    user_id     TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    purpose     TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER
) STRICT, WITHOUT ROWID;

CREATE INDEX one_time_tokens_by_user ON one_time_tokens (user_id);

-- TOTP recovery codes; a set is replaced whole when the user asks for new codes.
CREATE TABLE recovery_codes (
    user_id  TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    hash     TEXT    NOT NULL,
    used_at  INTEGER,
    PRIMARY KEY (user_id, hash)
) STRICT, WITHOUT ROWID;

CREATE TABLE invitations (
    id           TEXT    NOT NULL PRIMARY KEY,
    org_id       TEXT    NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    email        TEXT    NOT NULL,
    role         TEXT    NOT NULL CHECK (role IN ('viewer', 'editor', 'admin', 'owner')),
    token_hash   TEXT    NOT NULL UNIQUE,
    invited_by   TEXT    NOT NULL REFERENCES users (id),
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    accepted_at  INTEGER,
    accepted_by  TEXT    REFERENCES users (id),
    revoked_at   INTEGER
) STRICT;

CREATE INDEX invitations_by_org ON invitations (org_id, created_at DESC, id DESC);

-- The audit trail, append-only. It has no foreign keys on purpose: the record of what
-- happened outlives the org, user or key it names. AUTOINCREMENT keeps `seq`, the paging
-- cursor, from ever being reused.
CREATE TABLE audit_events (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    org_id            TEXT,
    actor_user_id     TEXT,
    actor_api_key_id  TEXT,
    action            TEXT    NOT NULL,
    target_kind       TEXT,
    target_id         TEXT,
    at                INTEGER NOT NULL,
    ip                TEXT,
    request_id        TEXT,
    outcome           TEXT    NOT NULL,
    status            INTEGER,
    -- A JSON value (an object in practice); never secrets.
    details           TEXT    NOT NULL
) STRICT;

CREATE INDEX audit_events_by_org ON audit_events (org_id, seq DESC);
CREATE INDEX audit_events_by_actor ON audit_events (actor_user_id, seq);
