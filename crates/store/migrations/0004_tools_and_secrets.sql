-- Tools an org registers, and its secrets. Conventions follow 0001_initial.sql: ids are
-- TEXT, timestamps INTEGER microseconds since the Unix epoch. As elsewhere, `org_id` carries
-- no foreign key: the storage port does not depend on the identity port.

-- Registered tools are versioned per org and name like pipelines: 1, 2, 3…, and a manifest
-- identical to a stored version (same digest) is that version. The manifest is its canonical
-- JSON text; the digest is the hex SHA-256 of that text.
CREATE TABLE tools (
    org_id      TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    digest      TEXT    NOT NULL,
    manifest    TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (org_id, name, version),
    UNIQUE (org_id, name, digest)
) STRICT;

-- An org's secrets, sealed by the caller (XChaCha20-Poly1305 under the master key `key_id`):
-- the clear value never reaches the store. `version` counts the values a name was given;
-- re-sealing under another master key keeps it.
CREATE TABLE secrets (
    org_id      TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    key_id      TEXT    NOT NULL,
    nonce       BLOB    NOT NULL,
    ciphertext  BLOB    NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (org_id, name)
) STRICT;
