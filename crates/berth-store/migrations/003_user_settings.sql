-- Per-user limits and GPUs (issue 16); NULL follows the server's [limits]. memory_bytes and
-- nano_cpus 0 mean no limit; gpus is `none`, `all` or a list of device ids.
ALTER TABLE users ADD COLUMN memory_bytes INTEGER;
ALTER TABLE users ADD COLUMN nano_cpus INTEGER;
ALTER TABLE users ADD COLUMN pids INTEGER;
ALTER TABLE users ADD COLUMN gpus TEXT;

-- Per-user shared folders: host directory `source` bind-mounted at `target` in her next
-- new container. The source is stored resolved (no symlinks), as it was checked.
CREATE TABLE mounts (
    user      TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    target    TEXT NOT NULL,
    source    TEXT NOT NULL,
    read_only INTEGER NOT NULL,
    PRIMARY KEY (user, target)
);
