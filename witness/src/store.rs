//! The witness's durable state: one record per cluster (epoch and holder) in
//! a sled database. A write is flushed to disk before [`Store::put_durable`]
//! returns: sled's flush, then `fsync` of sled's data file (sled 0.34 itself
//! only issues `sync_file_range` on Linux, which does not make the write
//! survive a power loss).
//!
//! Creating a database is made safe against a kill at any moment: the
//! directory gets a `ftvm-witness-creating` file, made durable before sled
//! writes anything, and removed (durably) only once the format marker is on
//! disk. A directory holding that file therefore never served a claim, and
//! the next start clears it and creates the database again. A directory
//! without it and without the format marker is refused (it may be a
//! damaged database that did serve claims). Every open holds
//! `ftvm-witness.lock` (flock) in the directory, so two processes never
//! decide about the same directory at once.
//!
//! Layout: the default tree holds `format` = [`STORE_FORMAT`]; the tree
//! `clusters` maps a cluster name to a record encoded as postcard
//! `(format: u8, epoch: u64, holder: Option<String>)` followed by a CRC-32 of
//! those bytes (little endian). Every record is checked when the store opens:
//! a database that does not decode is refused, never half-used.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Version of the on-disk layout.
pub const STORE_FORMAT: u8 = 1;
const FORMAT_KEY: &[u8] = b"ftvm-witness-format";
const CLUSTERS_TREE: &[u8] = b"clusters";
/// sled 0.34's data file inside the database directory.
const SLED_DATA_FILE: &str = "db";
/// sled 0.34's settings file (written without fsync by sled).
const SLED_CONF_FILE: &str = "conf";
/// What sled 0.34 creates in its directory besides `db` and `conf`.
const SLED_BLOBS_DIR: &str = "blobs";
const SLED_SNAPSHOT_PREFIX: &str = "snap.";
/// Present from before sled creates its files until the format marker is
/// durable: a directory holding it never served a claim.
pub const CREATING_FILE: &str = "ftvm-witness-creating";
/// Held (flock) by every process that has the database open.
pub const LOCK_FILE: &str = "ftvm-witness.lock";

/// The state of one cluster: the last granted epoch and who holds it.
/// A cluster never claimed is at epoch 0 with no holder.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub epoch: u64,
    pub holder: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    format: u8,
    epoch: u64,
    holder: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: does not exist")]
    Missing { path: PathBuf },
    #[error("database {path}: not created yet ({message}); `ftvm-witness run` creates it")]
    NotCreated { path: PathBuf, message: String },
    #[error("database {path}: is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("database {path}: is locked by another process (is an ftvm-witness running on it?): {message}")]
    Locked { path: PathBuf, message: String },
    #[error("database {path}: cannot open: {message}")]
    Open { path: PathBuf, message: String },
    #[error("database {path}: corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("database {path}: i/o error: {message}")]
    Io { path: PathBuf, message: String },
}

/// The sled-backed store.
pub struct Store {
    path: PathBuf,
    db: sled::Db,
    clusters: sled::Tree,
    /// sled's data file, opened again so that a flush can end with fsync:
    /// sled's own flush uses `sync_file_range` on Linux, which neither
    /// flushes the drive's write cache nor the file's metadata.
    data_file: std::fs::File,
    /// [`LOCK_FILE`], locked for as long as the store is open.
    _lock: std::fs::File,
}

/// What a database directory holds when a process (holding the lock) looks.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// Nothing (or only the lock file): a new database.
    Nothing,
    /// [`CREATING_FILE`] and whatever sled wrote before a kill.
    InterruptedCreation(Vec<String>),
    /// A database (checked further once sled opens it).
    Database,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (creating if missing) the database at `path` and checks every record.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Self::open_inner(path, true)
    }

    /// Opens an existing database (for `status`); refuses to create one.
    pub fn open_existing(path: &Path) -> Result<Store, StoreError> {
        Self::open_inner(path, false)
    }

    fn open_inner(path: &Path, create: bool) -> Result<Store, StoreError> {
        let p = path.to_path_buf();
        let io_err = |path: &Path, what: &str, e: std::io::Error| StoreError::Io {
            path: path.to_path_buf(),
            message: format!("{what}: {e}"),
        };
        match std::fs::metadata(path) {
            Ok(m) if !m.is_dir() => return Err(StoreError::NotADirectory { path: p }),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !create {
                    return Err(StoreError::Missing { path: p });
                }
                std::fs::create_dir_all(path).map_err(|e| io_err(path, "create", e))?;
                if let Some(parent) = path.parent() {
                    sync_dir(parent)?;
                }
            }
            Err(e) => {
                return Err(StoreError::Open {
                    path: p,
                    message: e.to_string(),
                })
            }
        }
        let lock = lock_dir(path)?;
        let found = look(path)?;
        let new_database = match (&found, create) {
            (Found::Database, _) => false,
            (Found::Nothing, false) => {
                return Err(StoreError::NotCreated {
                    path: p,
                    message: "the directory is empty".into(),
                })
            }
            (Found::InterruptedCreation(_), false) => {
                return Err(StoreError::NotCreated {
                    path: p,
                    message: "a first start was stopped while creating it; it never served a claim"
                        .into(),
                })
            }
            (Found::Nothing, true) => {
                write_durably(&path.join(CREATING_FILE))?;
                sync_dir(path)?;
                true
            }
            (Found::InterruptedCreation(left), true) => {
                tracing::warn!(db = %path.display(), left = ?left, "a previous start was stopped while creating this database (it never served a claim): creating it again");
                for name in left {
                    let entry = path.join(name);
                    let removed = if name == SLED_BLOBS_DIR {
                        std::fs::remove_dir_all(&entry)
                    } else {
                        std::fs::remove_file(&entry)
                    };
                    removed.map_err(|e| io_err(&entry, "remove", e))?;
                }
                sync_dir(path)?;
                true
            }
        };
        // sled may panic on some corrupt files instead of returning an error;
        // either way the store is refused.
        let opened = std::panic::catch_unwind(|| sled::Config::new().path(path).open());
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(sled::Error::Io(e))) if e.to_string().contains("could not acquire lock") => {
                return Err(StoreError::Locked {
                    path: p,
                    message: e.to_string(),
                })
            }
            Ok(Err(sled::Error::Corruption { .. })) => {
                return Err(StoreError::Corrupt {
                    path: p,
                    message: "sled reported corruption".into(),
                })
            }
            Ok(Err(e)) => {
                return Err(StoreError::Open {
                    path: p,
                    message: e.to_string(),
                })
            }
            Err(_) => {
                return Err(StoreError::Corrupt {
                    path: p,
                    message: "sled failed while reading it".into(),
                })
            }
        };
        let clusters = db.open_tree(CLUSTERS_TREE).map_err(|e| io(path, e))?;
        let data_path = path.join(SLED_DATA_FILE);
        let data_file = std::fs::File::open(&data_path).map_err(|e| StoreError::Io {
            path: data_path.clone(),
            message: e.to_string(),
        })?;
        let store = Store {
            path: p,
            db,
            clusters,
            data_file,
            _lock: lock,
        };
        if new_database {
            store.create_format()?;
        }
        store.check_format()?;
        store.check_records()?;
        Ok(store)
    }

    /// Writes the format marker of a new database and makes it durable, then
    /// removes [`CREATING_FILE`] (durably): from then on the directory is a
    /// witness database and may serve claims.
    fn create_format(&self) -> Result<(), StoreError> {
        if !self.clusters.is_empty() || !self.db.is_empty() {
            return Err(self.corrupt("a database being created already holds records".into()));
        }
        self.db
            .insert(FORMAT_KEY, &[STORE_FORMAT])
            .map_err(|e| io(&self.path, e))?;
        self.flush()?;
        let conf = self.path.join(SLED_CONF_FILE);
        std::fs::File::open(&conf)
            .and_then(|f| f.sync_all())
            .map_err(|e| StoreError::Io {
                path: conf,
                message: format!("fsync: {e}"),
            })?;
        sync_dir(&self.path)?;
        let creating = self.path.join(CREATING_FILE);
        std::fs::remove_file(&creating).map_err(|e| StoreError::Io {
            path: creating,
            message: format!("remove: {e}"),
        })?;
        sync_dir(&self.path)
    }

    fn corrupt(&self, message: String) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            message,
        }
    }

    fn check_format(&self) -> Result<(), StoreError> {
        match self.db.get(FORMAT_KEY).map_err(|e| io(&self.path, e))? {
            Some(v) if v.as_ref() == [STORE_FORMAT] => Ok(()),
            Some(v) => Err(self.corrupt(format!(
                "unknown store format {:?} (this build reads format {STORE_FORMAT})",
                v.as_ref()
            ))),
            None if !self.clusters.is_empty() || !self.db.is_empty() => {
                Err(self.corrupt("records present but no format marker".into()))
            }
            None => Err(self.corrupt(format!(
                "the directory holds no witness data (format marker missing) and is not \
                 a creation this witness was stopped in; refusing to treat it as a new \
                 database, which could forget grants. Witnesses before this one, killed \
                 while creating a database, left such directories (blobs/, conf, db and \
                 nothing else): if you know that no witness ever served a claim from it, \
                 remove it (`rm -r {}`) and start again; otherwise restore it from a backup",
                self.path.display()
            ))),
        }
    }

    fn check_records(&self) -> Result<(), StoreError> {
        for item in self.clusters.iter() {
            let (k, v) = item.map_err(|e| io(&self.path, e))?;
            let name = String::from_utf8(k.to_vec())
                .map_err(|_| self.corrupt(format!("cluster key {:?} is not UTF-8", k.as_ref())))?;
            self.decode(&name, &v)?;
        }
        Ok(())
    }

    fn decode(&self, cluster: &str, v: &[u8]) -> Result<ClusterState, StoreError> {
        let bad = |m: String| self.corrupt(format!("record of cluster {cluster:?}: {m}"));
        if v.len() < 4 {
            return Err(bad("too short".into()));
        }
        let (body, crc) = v.split_at(v.len() - 4);
        let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32fast::hash(body) != stored {
            return Err(bad("checksum mismatch".into()));
        }
        let (rec, rest) =
            postcard::take_from_bytes::<Record>(body).map_err(|e| bad(e.to_string()))?;
        if !rest.is_empty() || rec.format != STORE_FORMAT {
            return Err(bad(format!("unknown record format {}", rec.format)));
        }
        Ok(ClusterState {
            epoch: rec.epoch,
            holder: rec.holder,
        })
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state of `cluster` (epoch 0, no holder, when never claimed).
    pub fn get(&self, cluster: &str) -> Result<ClusterState, StoreError> {
        match self
            .clusters
            .get(cluster.as_bytes())
            .map_err(|e| io(&self.path, e))?
        {
            Some(v) => self.decode(cluster, &v),
            None => Ok(ClusterState::default()),
        }
    }

    /// Every cluster with a record, by name.
    pub fn all(&self) -> Result<Vec<(String, ClusterState)>, StoreError> {
        let mut out = Vec::new();
        for item in self.clusters.iter() {
            let (k, v) = item.map_err(|e| io(&self.path, e))?;
            let name = String::from_utf8_lossy(&k).into_owned();
            let st = self.decode(&name, &v)?;
            out.push((name, st));
        }
        Ok(out)
    }

    /// Writes the state of `cluster` and flushes it to disk before returning.
    pub fn put_durable(&self, cluster: &str, state: &ClusterState) -> Result<(), StoreError> {
        let mut v = postcard::to_stdvec(&Record {
            format: STORE_FORMAT,
            epoch: state.epoch,
            holder: state.holder.clone(),
        })
        .map_err(|e| StoreError::Io {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        let crc = crc32fast::hash(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        self.clusters
            .insert(cluster.as_bytes(), v)
            .map_err(|e| io(&self.path, e))?;
        self.flush()
    }

    /// Flushes everything written so far to disk: sled's flush, then fsync
    /// of its data file.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(|e| io(&self.path, e))?;
        self.data_file.sync_all().map_err(|e| StoreError::Io {
            path: self.path.join(SLED_DATA_FILE),
            message: format!("fsync: {e}"),
        })?;
        Ok(())
    }
}

/// Makes the entries of `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::Io {
            path: dir.to_path_buf(),
            message: format!("fsync of the directory: {e}"),
        })
}

/// Creates an empty file and makes it durable.
fn write_durably(path: &Path) -> Result<(), StoreError> {
    std::fs::File::create(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::Io {
            path: path.to_path_buf(),
            message: format!("create: {e}"),
        })
}

/// Takes [`LOCK_FILE`] in `dir`, or says who holds it.
fn lock_dir(dir: &Path) -> Result<std::fs::File, StoreError> {
    use fs2::FileExt;
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::Open {
            path: path.clone(),
            message: e.to_string(),
        })?;
    file.try_lock_exclusive().map_err(|e| StoreError::Locked {
        path: dir.to_path_buf(),
        message: format!("{}: {e}", path.display()),
    })?;
    Ok(file)
}

/// What `dir` holds (the caller holds its lock).
fn look(dir: &Path) -> Result<Found, StoreError> {
    let entries = std::fs::read_dir(dir).map_err(|e| StoreError::Open {
        path: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut names = Vec::new();
    for e in entries {
        let e = e.map_err(|e| StoreError::Open {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name != LOCK_FILE {
            names.push(name);
        }
    }
    names.sort();
    if names.is_empty() {
        return Ok(Found::Nothing);
    }
    if !names.iter().any(|n| n == CREATING_FILE) {
        return Ok(Found::Database);
    }
    names.retain(|n| n != CREATING_FILE);
    // Only what sled creates may be cleared; anything else was put there by
    // someone else, and is not ours to delete.
    let foreign: Vec<&String> = names
        .iter()
        .filter(|n| {
            ![SLED_DATA_FILE, SLED_CONF_FILE, SLED_BLOBS_DIR].contains(&n.as_str())
                && !n.starts_with(SLED_SNAPSHOT_PREFIX)
        })
        .collect();
    if !foreign.is_empty() {
        return Err(StoreError::Corrupt {
            path: dir.to_path_buf(),
            message: format!(
                "holds {CREATING_FILE} (a creation that was stopped) but also {foreign:?}, \
                 which a witness did not create; refusing to clear it"
            ),
        });
    }
    Ok(Found::InterruptedCreation(names))
}

fn io(path: &Path, e: sled::Error) -> StoreError {
    StoreError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens again a database this test just closed: sled 0.34 releases its
    /// lock from a background thread after the last handle is dropped, so
    /// the first tries may still find it locked (a process that exits
    /// releases it at once). The bound only catches a hang.
    fn reopen(open: impl Fn() -> Result<Store, StoreError>) -> Result<Store, StoreError> {
        let start = std::time::Instant::now();
        loop {
            match open() {
                Err(StoreError::Locked { .. })
                    if start.elapsed() < std::time::Duration::from_secs(60) =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                other => return other,
            }
        }
    }

    #[test]
    fn write_reopen_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        {
            let s = Store::open(&p).unwrap();
            assert_eq!(s.get("c").unwrap(), ClusterState::default());
            s.put_durable(
                "c",
                &ClusterState {
                    epoch: 3,
                    holder: Some("a".into()),
                },
            )
            .unwrap();
        }
        let s = reopen(|| Store::open_existing(&p)).unwrap();
        assert_eq!(s.get("c").unwrap().epoch, 3);
        assert_eq!(s.all().unwrap().len(), 1);
    }

    #[test]
    fn second_open_is_locked_and_missing_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        let _s = Store::open(&p).unwrap();
        let err = Store::open(&p).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        let err = Store::open_existing(&dir.path().join("none")).unwrap_err();
        assert!(err.to_string().contains("none"), "{err}");
    }

    #[test]
    fn garbage_record_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        {
            let s = Store::open(&p).unwrap();
            s.clusters.insert(b"c", &b"garbage!"[..]).unwrap();
            s.flush().unwrap();
        }
        let err = reopen(|| Store::open(&p)).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn existing_directory_without_marker_is_not_started_over() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        {
            let s = Store::open(&p).unwrap();
            s.db.remove(FORMAT_KEY).unwrap();
            s.flush().unwrap();
        }
        let err = reopen(|| Store::open(&p)).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        // Named for what it may be, with the one command that clears it.
        assert!(
            err.to_string()
                .contains(&format!("`rm -r {}`", p.display())),
            "{err}"
        );
        // An empty directory is a new database.
        let e = dir.path().join("empty");
        std::fs::create_dir(&e).unwrap();
        Store::open(&e).unwrap();
    }

    #[test]
    fn a_creation_that_was_stopped_is_created_again() {
        let dir = tempfile::tempdir().unwrap();
        // What a start killed at various moments leaves: the creating file
        // alone, with sled's blobs/, or with all of sled's files.
        for left in [&[][..], &["blobs"][..], &["blobs", "conf", "db"][..]] {
            let p = dir.path().join(format!("db-{}", left.len()));
            {
                // Real sled files, as sled wrote them before the marker.
                let db = sled::Config::new().path(&p).open().unwrap();
                db.flush().unwrap();
            }
            for e in std::fs::read_dir(&p).unwrap() {
                let e = e.unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                if !left.contains(&name.as_str()) {
                    if e.path().is_dir() {
                        std::fs::remove_dir_all(e.path()).unwrap();
                    } else {
                        std::fs::remove_file(e.path()).unwrap();
                    }
                }
            }
            std::fs::write(p.join(CREATING_FILE), b"").unwrap();
            // Status does not create it...
            let err = Store::open_existing(&p).unwrap_err();
            assert!(matches!(err, StoreError::NotCreated { .. }), "{err}");
            // ...a start does, and the creating file is gone.
            let s = reopen(|| Store::open(&p)).unwrap();
            assert_eq!(s.get("c").unwrap(), ClusterState::default());
            assert!(!p.join(CREATING_FILE).exists());
            s.put_durable(
                "c",
                &ClusterState {
                    epoch: 1,
                    holder: Some("a".into()),
                },
            )
            .unwrap();
            drop(s);
            let s = reopen(|| Store::open_existing(&p)).unwrap();
            assert_eq!(s.get("c").unwrap().epoch, 1);
        }
    }

    #[test]
    fn a_stopped_creation_with_foreign_files_is_not_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join(CREATING_FILE), b"").unwrap();
        std::fs::write(p.join("notes.txt"), b"mine").unwrap();
        let err = Store::open(&p).unwrap_err();
        assert!(
            matches!(err, StoreError::Corrupt { .. }) && err.to_string().contains("notes.txt"),
            "{err}"
        );
        assert!(p.join("notes.txt").exists());
    }
}
