-- Full-text search over log lines (`Store::search_logs`): an FTS5 index of `logs.text` with
-- `logs` as its external content, so the text is stored once. Triggers keep it in step in the
-- transaction of every change to `logs` (appends are one `INSERT … SELECT` whose rows each
-- fire the insert trigger), and the lines stored before this migration are indexed here.
--
-- Words are runs of letters and digits (unicode61; diacritics kept so that it agrees with
-- PostgreSQL's `simple` configuration); the query side (arches_core::log_search) splits words
-- the same way and quotes every one, so user text never reaches the FTS5 query syntax.
CREATE VIRTUAL TABLE logs_fts USING fts5(
    text,
    content = 'logs',
    content_rowid = 'seq',
    tokenize = 'unicode61 remove_diacritics 0'
);

CREATE TRIGGER logs_fts_insert AFTER INSERT ON logs BEGIN
    INSERT INTO logs_fts (rowid, text) VALUES (new.seq, new.text);
END;

CREATE TRIGGER logs_fts_delete AFTER DELETE ON logs BEGIN
    INSERT INTO logs_fts (logs_fts, rowid, text) VALUES ('delete', old.seq, old.text);
END;

CREATE TRIGGER logs_fts_update AFTER UPDATE OF seq, text ON logs BEGIN
    INSERT INTO logs_fts (logs_fts, rowid, text) VALUES ('delete', old.seq, old.text);
    INSERT INTO logs_fts (rowid, text) VALUES (new.seq, new.text);
END;

INSERT INTO logs_fts (logs_fts) VALUES ('rebuild');
