-- Full-text search over log lines (`Store::search_logs`): a GIN index of the words of
-- `logs.text`, kept by PostgreSQL in the transaction of every append; lines stored before
-- this migration are indexed when the index is built.
--
-- Words are runs of letters and digits: ASCII punctuation is turned into spaces before the
-- `simple` configuration (lowercase, no stemming, no stop words) parses the text, so that
-- `host-1.example.com` gives the words `host`, `1`, `example`, `com` as on SQLite rather
-- than one host name. Only the first 65,536 characters of a line are indexed, which keeps
-- every line under the tsvector size limit (1 MiB) whatever the engine's line bound. Queries
-- must use this same function to use the index.
CREATE FUNCTION arches_log_words(line text) RETURNS tsvector
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$
        SELECT to_tsvector(
            'simple'::regconfig,
            translate(left(line, 65536), '!"#$%&''()*+,-./:;<=>?@[\]^_`{|}~', repeat(' ', 32))
        )
    $$;

CREATE INDEX logs_by_words ON logs USING gin (arches_log_words(text));
