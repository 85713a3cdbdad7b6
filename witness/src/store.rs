//! The witness's durable state: one record per cluster (epoch and holder) in
//! a sled database. A write is flushed to disk before [`Store::put_durable`]
//! returns: sled's flush, then `fsync` of sled's data file (sled 0.34 itself
//! only issues `sync_file_range` on Linux, which does not make the write
//! survive a power loss).
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
        // A database is new only if its directory is absent or empty. An
        // existing one that comes back without our marker was damaged (sled
        // may open a corrupt data file as an empty database): it is refused,
        // never silently started over, since that would forget grants.
        let fresh = match std::fs::read_dir(path) {
            Ok(mut entries) => entries.next().is_none(),
            Err(_) => true,
        };
        match std::fs::metadata(path) {
            Ok(m) if !m.is_dir() => return Err(StoreError::NotADirectory { path: p }),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !create {
                    return Err(StoreError::Missing { path: p });
                }
            }
            Err(e) => {
                return Err(StoreError::Open {
                    path: p,
                    message: e.to_string(),
                })
            }
        }
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
        };
        store.check_format(create && fresh)?;
        store.check_records()?;
        Ok(store)
    }

    fn corrupt(&self, message: String) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            message,
        }
    }

    fn check_format(&self, new_database: bool) -> Result<(), StoreError> {
        match self.db.get(FORMAT_KEY).map_err(|e| io(&self.path, e))? {
            Some(v) if v.as_ref() == [STORE_FORMAT] => Ok(()),
            Some(v) => Err(self.corrupt(format!(
                "unknown store format {:?} (this build reads format {STORE_FORMAT})",
                v.as_ref()
            ))),
            None => {
                if !self.clusters.is_empty() || !self.db.is_empty() {
                    return Err(self.corrupt("records present but no format marker".into()));
                }
                if !new_database {
                    return Err(self.corrupt(
                        "the directory holds no witness data (format marker missing); \
                         refusing to treat it as a new database (move it aside to start over)"
                            .into(),
                    ));
                }
                self.db
                    .insert(FORMAT_KEY, &[STORE_FORMAT])
                    .map_err(|e| io(&self.path, e))?;
                self.flush()?;
                self.sync_dir()?;
                Ok(())
            }
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

    /// Makes the directory entries of a new database durable.
    fn sync_dir(&self) -> Result<(), StoreError> {
        let dir = std::fs::File::open(&self.path).and_then(|d| d.sync_all());
        dir.map_err(|e| StoreError::Io {
            path: self.path.clone(),
            message: format!("fsync of the directory: {e}"),
        })
    }
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
        let s = Store::open_existing(&p).unwrap();
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
        let err = Store::open(&p).unwrap_err();
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
        let err = Store::open(&p).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        // An empty directory is a new database.
        let e = dir.path().join("empty");
        std::fs::create_dir(&e).unwrap();
        Store::open(&e).unwrap();
    }
}
