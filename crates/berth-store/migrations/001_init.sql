CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('instance', lower(hex(randomblob(6))));

CREATE TABLE users (
    name            TEXT PRIMARY KEY,
    image           TEXT NOT NULL,
    daemon_mode     INTEGER NOT NULL DEFAULT 0,
    committed_image TEXT,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);

CREATE TABLE keys (
    user        TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    fingerprint TEXT NOT NULL,
    algorithm   TEXT NOT NULL,
    openssh     TEXT NOT NULL,
    comment     TEXT NOT NULL,
    added_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
    PRIMARY KEY (user, fingerprint)
);
