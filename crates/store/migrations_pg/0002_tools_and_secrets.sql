-- Tools an org registers, and its secrets: the tables of the SQLite store's
-- 0004_tools_and_secrets.sql in PostgreSQL's native types, with the conventions of
-- 0001_initial.sql (uuid ids, bigint microseconds, names sorted `COLLATE "C"`).

-- Registered tools are versioned per org and name like pipelines; the next version of a name
-- is chosen under the name's advisory lock (see `save_tool`). The digest is the hex SHA-256 of
-- the manifest's canonical JSON text.
CREATE TABLE tools (
    org_id      uuid    NOT NULL,
    name        text    COLLATE "C" NOT NULL,
    version     bigint  NOT NULL,
    digest      text    NOT NULL,
    manifest    jsonb   NOT NULL,
    created_at  bigint  NOT NULL,
    PRIMARY KEY (org_id, name, version),
    UNIQUE (org_id, name, digest)
);

-- An org's secrets, sealed by the caller: the clear value never reaches the store.
CREATE TABLE secrets (
    org_id      uuid    NOT NULL,
    name        text    COLLATE "C" NOT NULL,
    version     bigint  NOT NULL,
    key_id      text    NOT NULL,
    nonce       bytea   NOT NULL,
    ciphertext  bytea   NOT NULL,
    created_at  bigint  NOT NULL,
    updated_at  bigint  NOT NULL,
    PRIMARY KEY (org_id, name)
);
