//! The SQLite store: users, their keys and the per-user settings that must outlive a
//! container (image, daemon mode, committed image).
//!
//! Knows nothing of SSH or Docker. One connection behind a mutex; callers in async code run
//! these methods on a blocking thread. Invariants kept by the schema: a key belongs to
//! exactly one user (removing the user removes the keys), and a user's key fingerprints are
//! unique. Migrations are numbered SQL files applied in order and recorded in
//! `PRAGMA user_version`, each in its own transaction.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use berth_proto::{AuthorizedKey, ImageName, KeyInfo, UserName};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/001_init.sql"),
    include_str!("../migrations/002_forwarding.sql"),
    include_str!("../migrations/003_user_settings.sql"),
];

/// What an admin set for one user apart from the server (`berth user set`); `None` follows
/// the server's `[limits]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserSettings {
    /// Bytes; `Some(0)`: no limit.
    pub memory_bytes: Option<u64>,
    /// Nano-CPUs; `Some(0)`: no limit.
    pub nano_cpus: Option<u64>,
    pub pids: Option<u32>,
    /// `none`, `all` or device ids, as `berth_proto::settings::Gpus` writes them.
    pub gpus: Option<String>,
    /// Her own shared folders, by target.
    pub mounts: Vec<UserMount>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserMount {
    pub source: String,
    pub target: String,
    pub read_only: bool,
}

/// Per-user switches; `None` follows the server-wide setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forwarding {
    pub tcp: Option<bool>,
    pub agent: Option<bool>,
    pub x11: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("user {0} already exists")]
    UserExists(UserName),
    #[error("user {0} not found")]
    UserNotFound(UserName),
    #[error("user {user} already has key {fingerprint}")]
    KeyExists { user: UserName, fingerprint: String },
    #[error("user {user} has no key {fingerprint}")]
    KeyNotFound { user: UserName, fingerprint: String },
    #[error("user {0} would be left without a key; add another first or remove the user")]
    LastKey(UserName),
    #[error("corrupt row in the store: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database lock poisoned")]
    Poisoned,
}

impl StoreError {
    /// The database could not be written for want of space (its file system is full).
    pub fn is_disk_full(&self) -> bool {
        matches!(
            self,
            Self::Sqlite(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DiskFull
                    || e.extended_code == rusqlite::ffi::SQLITE_IOERR_SHMSIZE
                    || e.extended_code == rusqlite::ffi::SQLITE_IOERR_WRITE
        )
    }
}

/// A user as the store knows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub name: UserName,
    pub image: ImageName,
    pub daemon_mode: bool,
    pub committed_image: Option<ImageName>,
    pub keys: usize,
    pub forwarding: Forwarding,
}

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// An in-memory store, for tests.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, sql) in (0_i64..)
            .zip(MIGRATIONS.iter())
            .skip(usize::try_from(version).unwrap_or(0))
        {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
        }
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn conn(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| StoreError::Poisoned)
    }

    /// A random id made when the database was created. Containers are labelled with it, so
    /// two Berth instances on one engine never touch each other's containers.
    pub fn instance_id(&self) -> Result<String, StoreError> {
        Ok(self
            .conn()?
            .query_row("SELECT value FROM meta WHERE key = 'instance'", [], |r| {
                r.get(0)
            })?)
    }

    pub fn add_user(
        &self,
        name: &UserName,
        image: &ImageName,
        keys: &[AuthorizedKey],
    ) -> Result<UserRecord, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let exists: bool = tx.query_row(
            "SELECT EXISTS(SELECT 1 FROM users WHERE name = ?1)",
            [name.as_str()],
            |r| r.get(0),
        )?;
        if exists {
            return Err(StoreError::UserExists(name.clone()));
        }
        tx.execute(
            "INSERT INTO users (name, image) VALUES (?1, ?2)",
            params![name.as_str(), image.as_str()],
        )?;
        insert_keys(&tx, name, keys)?;
        tx.commit()?;
        Ok(UserRecord {
            name: name.clone(),
            image: image.clone(),
            daemon_mode: false,
            committed_image: None,
            keys: keys.len(),
            forwarding: Forwarding::default(),
        })
    }

    pub fn remove_user(&self, name: &UserName) -> Result<(), StoreError> {
        let n = self
            .conn()?
            .execute("DELETE FROM users WHERE name = ?1", [name.as_str()])?;
        if n == 0 {
            return Err(StoreError::UserNotFound(name.clone()));
        }
        Ok(())
    }

    /// Daemon mode on: the container keeps running with no session open.
    pub fn set_daemon_mode(&self, name: &UserName, on: bool) -> Result<(), StoreError> {
        let n = self.conn()?.execute(
            "UPDATE users SET daemon_mode = ?2 WHERE name = ?1",
            params![name.as_str(), on],
        )?;
        if n == 0 {
            return Err(StoreError::UserNotFound(name.clone()));
        }
        Ok(())
    }

    pub fn set_forwarding(&self, name: &UserName, f: Forwarding) -> Result<(), StoreError> {
        let n = self.conn()?.execute(
            "UPDATE users SET tcp_forwarding = ?2, agent_forwarding = ?3, x11_forwarding = ?4 WHERE name = ?1",
            params![name.as_str(), f.tcp, f.agent, f.x11],
        )?;
        if n == 0 {
            return Err(StoreError::UserNotFound(name.clone()));
        }
        Ok(())
    }

    /// The image the user's next new container is made from, instead of her base image.
    pub fn set_committed_image(
        &self,
        name: &UserName,
        image: Option<&ImageName>,
    ) -> Result<(), StoreError> {
        let n = self.conn()?.execute(
            "UPDATE users SET committed_image = ?2 WHERE name = ?1",
            params![name.as_str(), image.map(ImageName::as_str)],
        )?;
        if n == 0 {
            return Err(StoreError::UserNotFound(name.clone()));
        }
        Ok(())
    }

    /// The image the user's next new container is made from when she has no committed
    /// image (`berth user set --image`).
    pub fn set_image(&self, name: &UserName, image: &ImageName) -> Result<(), StoreError> {
        let n = self.conn()?.execute(
            "UPDATE users SET image = ?2 WHERE name = ?1",
            params![name.as_str(), image.as_str()],
        )?;
        if n == 0 {
            return Err(StoreError::UserNotFound(name.clone()));
        }
        Ok(())
    }

    /// What `berth user set` gave `name` apart from the server.
    pub fn settings(&self, name: &UserName) -> Result<UserSettings, StoreError> {
        let conn = self.conn()?;
        let row = conn
            .prepare_cached(
                "SELECT memory_bytes, nano_cpus, pids, gpus FROM users WHERE name = ?1",
            )?
            .query_row([name.as_str()], |r| {
                Ok((
                    r.get::<_, Option<i64>>(0)?,
                    r.get::<_, Option<i64>>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                ))
            })
            .optional()?
            .ok_or_else(|| StoreError::UserNotFound(name.clone()))?;
        let corrupt = |what: &str| StoreError::Corrupt(format!("{what} of user {name}"));
        let unsigned = |v: Option<i64>, what: &str| {
            v.map(|v| u64::try_from(v).map_err(|_| corrupt(what)))
                .transpose()
        };
        let mut stmt = conn.prepare_cached(
            "SELECT source, target, read_only FROM mounts WHERE user = ?1 ORDER BY target",
        )?;
        let mounts = stmt
            .query_map([name.as_str()], |r| {
                Ok(UserMount {
                    source: r.get(0)?,
                    target: r.get(1)?,
                    read_only: r.get(2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(UserSettings {
            memory_bytes: unsigned(row.0, "memory_bytes")?,
            nano_cpus: unsigned(row.1, "nano_cpus")?,
            pids: row
                .2
                .map(|v| u32::try_from(v).map_err(|_| corrupt("pids")))
                .transpose()?,
            gpus: row.3,
            mounts,
        })
    }

    /// Replaces what `berth user set` gave `name`, all of it in one transaction.
    pub fn set_settings(&self, name: &UserName, s: &UserSettings) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let signed = |v: Option<u64>| v.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
        let n = tx.execute(
            "UPDATE users SET memory_bytes = ?2, nano_cpus = ?3, pids = ?4, gpus = ?5 WHERE name = ?1",
            params![
                name.as_str(),
                signed(s.memory_bytes),
                signed(s.nano_cpus),
                s.pids,
                s.gpus
            ],
        )?;
        if n == 0 {
            return Err(StoreError::UserNotFound(name.clone()));
        }
        tx.execute("DELETE FROM mounts WHERE user = ?1", [name.as_str()])?;
        for m in &s.mounts {
            tx.execute(
                "INSERT INTO mounts (user, target, source, read_only) VALUES (?1, ?2, ?3, ?4)",
                params![name.as_str(), m.target, m.source, m.read_only],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn user(&self, name: &UserName) -> Result<UserRecord, StoreError> {
        let conn = self.conn()?;
        let row = conn
            .prepare_cached(
                "SELECT name, image, daemon_mode, committed_image,
                        (SELECT count(*) FROM keys WHERE keys.user = users.name),
                        tcp_forwarding, agent_forwarding, x11_forwarding
                 FROM users WHERE name = ?1",
            )?
            .query_row([name.as_str()], raw_user)
            .optional()?;
        match row {
            Some(raw) => user_from_raw(raw),
            None => Err(StoreError::UserNotFound(name.clone())),
        }
    }

    pub fn users(&self) -> Result<Vec<UserRecord>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT name, image, daemon_mode, committed_image,
                    (SELECT count(*) FROM keys WHERE keys.user = users.name),
                    tcp_forwarding, agent_forwarding, x11_forwarding
             FROM users ORDER BY name",
        )?;
        let raws = stmt
            .query_map([], raw_user)?
            .collect::<Result<Vec<_>, _>>()?;
        raws.into_iter().map(user_from_raw).collect()
    }

    pub fn keys(&self, name: &UserName) -> Result<Vec<KeyInfo>, StoreError> {
        let conn = self.conn()?;
        ensure_user(&conn, name)?;
        let mut stmt = conn.prepare(
            "SELECT fingerprint, algorithm, comment FROM keys WHERE user = ?1 ORDER BY rowid",
        )?;
        let keys = stmt
            .query_map([name.as_str()], |r| {
                Ok(KeyInfo {
                    fingerprint: r.get(0)?,
                    algorithm: r.get(1)?,
                    comment: r.get(2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(keys)
    }

    /// `name`'s keys as they were added (`berth user export`).
    pub fn authorized_keys(&self, name: &UserName) -> Result<Vec<AuthorizedKey>, StoreError> {
        let conn = self.conn()?;
        ensure_user(&conn, name)?;
        let mut stmt = conn.prepare(
            "SELECT fingerprint, algorithm, openssh, comment FROM keys WHERE user = ?1 ORDER BY rowid",
        )?;
        let keys = stmt
            .query_map([name.as_str()], |r| {
                Ok(AuthorizedKey {
                    fingerprint: r.get(0)?,
                    algorithm: r.get(1)?,
                    openssh: r.get(2)?,
                    comment: r.get(3)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(keys)
    }

    pub fn add_keys(&self, name: &UserName, keys: &[AuthorizedKey]) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        ensure_user(&tx, name)?;
        insert_keys(&tx, name, keys)?;
        tx.commit()?;
        Ok(())
    }

    /// Removes one key by fingerprint. Refuses to remove a user's last key: a user with no
    /// key could never log in, which is what `user rm` is for.
    pub fn remove_key(&self, name: &UserName, fingerprint: &str) -> Result<KeyInfo, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        ensure_user(&tx, name)?;
        let key = tx
            .query_row(
                "SELECT fingerprint, algorithm, comment FROM keys WHERE user = ?1 AND fingerprint = ?2",
                params![name.as_str(), fingerprint],
                |r| Ok(KeyInfo { fingerprint: r.get(0)?, algorithm: r.get(1)?, comment: r.get(2)? }),
            )
            .optional()?
            .ok_or_else(|| StoreError::KeyNotFound {
                user: name.clone(),
                fingerprint: fingerprint.to_owned(),
            })?;
        let count: i64 = tx.query_row(
            "SELECT count(*) FROM keys WHERE user = ?1",
            [name.as_str()],
            |r| r.get(0),
        )?;
        if count <= 1 {
            return Err(StoreError::LastKey(name.clone()));
        }
        tx.execute(
            "DELETE FROM keys WHERE user = ?1 AND fingerprint = ?2",
            params![name.as_str(), fingerprint],
        )?;
        tx.commit()?;
        Ok(key)
    }

    /// Whether `fingerprint` is one of `name`'s keys. An unknown user is simply `false`, so
    /// the caller cannot tell the two refusals apart (nor can the client).
    pub fn key_authorized(&self, name: &str, fingerprint: &str) -> Result<bool, StoreError> {
        // Asked on every login (twice: the key's offer, then its signature): prepared once.
        Ok(self
            .conn()?
            .prepare_cached(
                "SELECT EXISTS(SELECT 1 FROM keys WHERE user = ?1 AND fingerprint = ?2)",
            )?
            .query_row(params![name, fingerprint], |r| r.get(0))?)
    }
}

type RawUser = (String, String, bool, Option<String>, i64, Forwarding);

fn raw_user(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawUser> {
    let forwarding = Forwarding {
        tcp: r.get(5)?,
        agent: r.get(6)?,
        x11: r.get(7)?,
    };
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        forwarding,
    ))
}

fn user_from_raw(
    (name, image, daemon_mode, committed, keys, forwarding): RawUser,
) -> Result<UserRecord, StoreError> {
    let corrupt = |e: berth_proto::NameError| StoreError::Corrupt(e.to_string());
    Ok(UserRecord {
        name: UserName::parse(&name).map_err(corrupt)?,
        image: ImageName::parse(&image).map_err(corrupt)?,
        daemon_mode,
        committed_image: committed
            .as_deref()
            .map(ImageName::parse)
            .transpose()
            .map_err(corrupt)?,
        keys: usize::try_from(keys).unwrap_or(0),
        forwarding,
    })
}

fn ensure_user(conn: &Connection, name: &UserName) -> Result<(), StoreError> {
    let exists: bool = conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM users WHERE name = ?1)",
        [name.as_str()],
        |r| r.get(0),
    )?;
    if exists {
        Ok(())
    } else {
        Err(StoreError::UserNotFound(name.clone()))
    }
}

fn insert_keys(
    conn: &Connection,
    name: &UserName,
    keys: &[AuthorizedKey],
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare(
        "INSERT INTO keys (user, fingerprint, algorithm, openssh, comment) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for k in keys {
        let exists: bool = conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM keys WHERE user = ?1 AND fingerprint = ?2)",
            params![name.as_str(), k.fingerprint],
            |r| r.get(0),
        )?;
        if exists {
            return Err(StoreError::KeyExists {
                user: name.clone(),
                fingerprint: k.fingerprint.clone(),
            });
        }
        stmt.execute(params![
            name.as_str(),
            k.fingerprint,
            k.algorithm,
            k.openssh,
            k.comment
        ])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl one";
    const K2: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBm3yTv8r4ZMvZcJ4JmFzk4K3l9F4QO9n3mVmWsmf3Gq two";

    fn key(s: &str) -> AuthorizedKey {
        AuthorizedKey::parse_line(s).unwrap()
    }
    fn user(s: &str) -> UserName {
        UserName::parse(s).unwrap()
    }

    #[test]
    fn add_list_remove() {
        let s = Store::open_in_memory().unwrap();
        let img = ImageName::parse("busybox").unwrap();
        s.add_user(&user("alice"), &img, &[key(K1)]).unwrap();
        assert!(matches!(
            s.add_user(&user("alice"), &img, &[key(K2)]),
            Err(StoreError::UserExists(_))
        ));
        assert_eq!(s.users().unwrap().len(), 1);
        assert_eq!(s.user(&user("alice")).unwrap().keys, 1);
        let fp = key(K1).fingerprint;
        assert!(s.key_authorized("alice", &fp).unwrap());
        assert!(!s.key_authorized("bob", &fp).unwrap());
        assert!(!s.key_authorized("alice", &key(K2).fingerprint).unwrap());
        let f = Forwarding {
            tcp: Some(false),
            agent: None,
            x11: Some(true),
        };
        s.set_forwarding(&user("alice"), f).unwrap();
        assert_eq!(s.user(&user("alice")).unwrap().forwarding, f);
        s.set_daemon_mode(&user("alice"), true).unwrap();
        assert!(s.user(&user("alice")).unwrap().daemon_mode);
        let debian = ImageName::parse("debian:12").unwrap();
        s.set_image(&user("alice"), &debian).unwrap();
        assert_eq!(s.user(&user("alice")).unwrap().image, debian);
        assert!(matches!(
            s.set_image(&user("zed"), &debian),
            Err(StoreError::UserNotFound(_))
        ));
        assert!(matches!(
            s.set_daemon_mode(&user("zed"), true),
            Err(StoreError::UserNotFound(_))
        ));
        s.remove_user(&user("alice")).unwrap();
        assert!(!s.key_authorized("alice", &fp).unwrap());
        assert!(matches!(
            s.remove_user(&user("alice")),
            Err(StoreError::UserNotFound(_))
        ));
    }

    #[test]
    fn settings_round_trip_and_go_with_the_user() {
        let s = Store::open_in_memory().unwrap();
        let img = ImageName::parse("busybox").unwrap();
        s.add_user(&user("erin"), &img, &[key(K1)]).unwrap();
        assert_eq!(s.settings(&user("erin")).unwrap(), UserSettings::default());
        let set = UserSettings {
            memory_bytes: Some(8 << 30),
            nano_cpus: Some(0),
            pids: Some(4096),
            gpus: Some("0,2".into()),
            mounts: vec![
                UserMount {
                    source: "/srv/a".into(),
                    target: "/project".into(),
                    read_only: true,
                },
                UserMount {
                    source: "/srv/b".into(),
                    target: "/data".into(),
                    read_only: false,
                },
            ],
        };
        s.set_settings(&user("erin"), &set).unwrap();
        let mut want = set.clone();
        want.mounts.sort_by(|a, b| a.target.cmp(&b.target));
        assert_eq!(s.settings(&user("erin")).unwrap(), want);
        s.set_settings(&user("erin"), &UserSettings::default())
            .unwrap();
        assert_eq!(s.settings(&user("erin")).unwrap(), UserSettings::default());
        assert!(matches!(
            s.set_settings(&user("zed"), &set),
            Err(StoreError::UserNotFound(_))
        ));
        s.set_settings(&user("erin"), &set).unwrap();
        s.remove_user(&user("erin")).unwrap();
        s.add_user(&user("erin"), &img, &[key(K1)]).unwrap();
        assert_eq!(s.settings(&user("erin")).unwrap(), UserSettings::default());
    }

    #[test]
    fn failed_add_changes_nothing() {
        let s = Store::open_in_memory().unwrap();
        let img = ImageName::parse("busybox").unwrap();
        // The same key twice in one request: the whole add is refused.
        assert!(matches!(
            s.add_user(&user("bob"), &img, &[key(K1), key(K1)]),
            Err(StoreError::KeyExists { .. })
        ));
        assert!(s.users().unwrap().is_empty());
    }

    #[test]
    fn keys_add_remove_last_key_kept() {
        let s = Store::open_in_memory().unwrap();
        let img = ImageName::parse("busybox").unwrap();
        s.add_user(&user("carol"), &img, &[key(K1)]).unwrap();
        s.add_keys(&user("carol"), &[key(K2)]).unwrap();
        assert!(matches!(
            s.add_keys(&user("carol"), &[key(K2)]),
            Err(StoreError::KeyExists { .. })
        ));
        assert_eq!(s.keys(&user("carol")).unwrap().len(), 2);
        s.remove_key(&user("carol"), &key(K1).fingerprint).unwrap();
        assert!(matches!(
            s.remove_key(&user("carol"), &key(K2).fingerprint),
            Err(StoreError::LastKey(_))
        ));
        assert!(matches!(
            s.remove_key(&user("carol"), "SHA256:nope"),
            Err(StoreError::KeyNotFound { .. })
        ));
    }

    #[test]
    fn reopen_keeps_instance_and_data() {
        let dir = std::env::temp_dir().join(format!("berth-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("berth.db");
        let s = Store::open(&path).unwrap();
        let id = s.instance_id().unwrap();
        s.add_user(
            &user("dave"),
            &ImageName::parse("busybox").unwrap(),
            &[key(K1)],
        )
        .unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.instance_id().unwrap(), id);
        assert_eq!(s.users().unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
