//! This node's durable state (`ft.state_dir`, a sled database): the pair's
//! epoch as this node last learned it, the role it last held in that epoch,
//! and whether it is fenced. Every change is on disk (sled's flush, then
//! fsync of its data file) before the node acts on it, so a restarted node
//! never goes live on stale state (DESIGN.md 6).
//!
//! Layout: key `node` of the default tree holds a postcard [`NodeRecord`]
//! followed by a CRC-32 of it; key `format` holds [`FORMAT`].

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const FORMAT: u8 = 1;
const FORMAT_KEY: &[u8] = b"ftvm-node-format";
const RECORD_KEY: &[u8] = b"node";
/// sled 0.34's data file inside the database directory.
const SLED_DATA_FILE: &str = "db";

/// The role a node held when it last wrote its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum StoredRole {
    /// Never paired.
    #[default]
    None,
    Primary,
    Backup,
}

/// What survives a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NodeRecord {
    pub cluster: String,
    pub epoch: u64,
    pub role: StoredRole,
    /// Set when the node was fenced: why. A fenced node never goes live
    /// again; it can only return as a backup through re-protection.
    pub fenced: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeStateError {
    #[error("node state {path}: is locked by another process (is another ftvm running on it?): {message}")]
    Locked { path: PathBuf, message: String },
    #[error("node state {path}: cannot open: {message}")]
    Open { path: PathBuf, message: String },
    #[error("node state {path}: corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("node state {path}: i/o error: {message}")]
    Io { path: PathBuf, message: String },
    #[error(
        "node state {path}: belongs to cluster {found:?}, this node is configured for {expected:?}"
    )]
    OtherCluster {
        path: PathBuf,
        found: String,
        expected: String,
    },
}

/// The open node state database.
pub struct NodeState {
    path: PathBuf,
    db: sled::Db,
    data_file: std::fs::File,
    record: NodeRecord,
}

impl std::fmt::Debug for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeState")
            .field("path", &self.path)
            .field("record", &self.record)
            .finish()
    }
}

impl NodeState {
    /// Opens (creating if missing) the state of a node of `cluster`.
    pub fn open(path: &Path, cluster: &str) -> Result<Self, NodeStateError> {
        let p = path.to_path_buf();
        let opened = std::panic::catch_unwind(|| sled::Config::new().path(path).open());
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(sled::Error::Io(e))) if e.to_string().contains("could not acquire lock") => {
                return Err(NodeStateError::Locked {
                    path: p,
                    message: e.to_string(),
                })
            }
            Ok(Err(e)) => {
                return Err(NodeStateError::Open {
                    path: p,
                    message: e.to_string(),
                })
            }
            Err(_) => {
                return Err(NodeStateError::Corrupt {
                    path: p,
                    message: "sled could not read the database".into(),
                })
            }
        };
        let data_file = std::fs::OpenOptions::new()
            .write(true)
            .open(path.join(SLED_DATA_FILE))
            .map_err(|e| NodeStateError::Open {
                path: p.clone(),
                message: format!("opening {SLED_DATA_FILE} for fsync: {e}"),
            })?;
        let io = |e: sled::Error| NodeStateError::Io {
            path: p.clone(),
            message: e.to_string(),
        };
        let corrupt = |m: String| NodeStateError::Corrupt {
            path: p.clone(),
            message: m,
        };
        let record = match db.get(RECORD_KEY).map_err(io)? {
            None => NodeRecord {
                cluster: cluster.to_string(),
                ..NodeRecord::default()
            },
            Some(v) => {
                match db.get(FORMAT_KEY).map_err(io)?.as_deref() {
                    Some([FORMAT]) => {}
                    other => return Err(corrupt(format!("unknown format marker {other:?}"))),
                }
                decode(&v).map_err(corrupt)?
            }
        };
        if record.cluster != cluster {
            return Err(NodeStateError::OtherCluster {
                path: p,
                found: record.cluster,
                expected: cluster.to_string(),
            });
        }
        let state = NodeState {
            path: p,
            db,
            data_file,
            record,
        };
        state.sync_dir()?;
        Ok(state)
    }

    pub fn record(&self) -> &NodeRecord {
        &self.record
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Changes the record with `f` and makes it durable before returning.
    pub fn update(&mut self, f: impl FnOnce(&mut NodeRecord)) -> Result<(), NodeStateError> {
        let mut next = self.record.clone();
        f(&mut next);
        let io = |e: String| NodeStateError::Io {
            path: self.path.clone(),
            message: e,
        };
        self.db
            .insert(FORMAT_KEY, &[FORMAT])
            .map_err(|e| io(e.to_string()))?;
        self.db
            .insert(RECORD_KEY, encode(&next).map_err(io)?)
            .map_err(|e| io(e.to_string()))?;
        self.db.flush().map_err(|e| io(e.to_string()))?;
        self.data_file
            .sync_all()
            .map_err(|e| io(format!("fsync of {SLED_DATA_FILE}: {e}")))?;
        self.record = next;
        Ok(())
    }

    fn sync_dir(&self) -> Result<(), NodeStateError> {
        std::fs::File::open(&self.path)
            .and_then(|d| d.sync_all())
            .map_err(|e| NodeStateError::Io {
                path: self.path.clone(),
                message: format!("fsync of the directory: {e}"),
            })
    }
}

fn encode(r: &NodeRecord) -> Result<Vec<u8>, String> {
    let mut v = postcard::to_stdvec(r).map_err(|e| e.to_string())?;
    let crc = crc32fast::hash(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    Ok(v)
}

fn decode(v: &[u8]) -> Result<NodeRecord, String> {
    if v.len() < 4 {
        return Err("record too short".into());
    }
    let (body, crc) = v.split_at(v.len() - 4);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32fast::hash(body) != stored {
        return Err("record checksum mismatch".into());
    }
    postcard::from_bytes(body).map_err(|e| format!("undecodable record: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_refuses_another_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state");
        {
            let mut s = NodeState::open(&p, "lab").unwrap();
            assert_eq!(s.record().epoch, 0);
            s.update(|r| {
                r.epoch = 3;
                r.role = StoredRole::Backup;
            })
            .unwrap();
        }
        let mut s = NodeState::open(&p, "lab").unwrap();
        assert_eq!(s.record().epoch, 3);
        assert_eq!(s.record().role, StoredRole::Backup);
        s.update(|r| r.fenced = Some("lost the claim for epoch 4".into()))
            .unwrap();
        drop(s);
        let err = NodeState::open(&p, "prod").unwrap_err().to_string();
        assert!(err.contains("\"lab\"") && err.contains("\"prod\""), "{err}");
        let s = NodeState::open(&p, "lab").unwrap();
        assert!(s.record().fenced.is_some());
    }

    #[test]
    fn a_damaged_record_is_refused() {
        assert!(decode(&[1, 2, 3]).is_err());
        let mut v = encode(&NodeRecord::default()).unwrap();
        v[0] ^= 1;
        assert!(decode(&v).unwrap_err().contains("checksum"));
    }
}
