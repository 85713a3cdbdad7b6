//! Who may pair with whom (DESIGN.md 5): the checks of the hello, made by
//! both sides. The backup says who it is and what it runs; the primary
//! checks it against its own configuration and log, and the backup checks
//! the primary's answer the same way. Any mismatch refuses the pairing with
//! a reason that both sides print.

use super::proto::{Hello, Welcome};
use crate::replay::digest::hex;
use crate::replay::log::{DiskReads, LogHeader, MachineShape, LOG_FORMAT_VERSION};

/// What this node knows when it judges a peer.
#[derive(Debug, Clone)]
pub struct Identity {
    pub node: String,
    pub cluster: String,
    pub peer: String,
    pub disk_reads: DiskReads,
}

fn root_text(r: &Option<[u8; 32]>) -> String {
    r.map_or("none (no disk)".to_string(), |r| hex(&r)[..16].to_string())
}

/// The primary's checks of a backup's hello. `cert_name` is the node name
/// of the certificate the backup presented; `epoch` the primary's epoch;
/// `header` where the primary's log starts.
pub fn check_hello(
    me: &Identity,
    cert_name: &str,
    hello: &Hello,
    epoch: u64,
    header: &LogHeader,
) -> Result<(), String> {
    if cert_name != me.peer {
        return Err(format!(
            "the peer's certificate names node {cert_name:?}, but this node's configured peer is {:?}",
            me.peer
        ));
    }
    if hello.node != cert_name {
        return Err(format!(
            "the peer calls itself {:?}, but its certificate names {cert_name:?}",
            hello.node
        ));
    }
    if hello.peer != me.node {
        return Err(format!(
            "the peer {:?} is configured to pair with {:?}, not with this node {:?}",
            hello.node, hello.peer, me.node
        ));
    }
    if hello.cluster != me.cluster {
        return Err(format!(
            "the peer is in cluster {:?}, this node in {:?}",
            hello.cluster, me.cluster
        ));
    }
    if hello.log_format != LOG_FORMAT_VERSION {
        return Err(format!(
            "the peer reads log format {}, this node writes {LOG_FORMAT_VERSION}",
            hello.log_format
        ));
    }
    if hello.epoch > epoch {
        return Err(format!(
            "the peer has seen epoch {}, this primary is at epoch {epoch}: this primary is stale",
            hello.epoch
        ));
    }
    if let Some(why) = header.shape.mismatch(&hello.shape, "the peer") {
        return Err(why);
    }
    if hello.disk_reads != me.disk_reads {
        return Err(format!(
            "the peer is configured for disk_reads = {:?}, this node for {:?}",
            hello.disk_reads.name(),
            me.disk_reads.name()
        ));
    }
    if hello.position.received == 0 {
        if hello.position.ordinal != header.start_ordinal {
            return Err(format!(
                "the peer's machine is at exit {}, this log starts after exit {}: it cannot follow it without a full copy",
                hello.position.ordinal, header.start_ordinal
            ));
        }
        if hello.disk_root != header.disk_root {
            return Err(format!(
                "the disks differ: the peer's disk root is {}, this log starts from a disk with root {}",
                root_text(&hello.disk_root),
                root_text(&header.disk_root)
            ));
        }
    }
    Ok(())
}

/// The primary's checks of a backup asking to join: the same peer, cluster,
/// versions, machine and disk-read mode (its disk and memory will be copied).
pub fn check_join(
    me: &Identity,
    cert_name: &str,
    hello: &Hello,
    epoch: u64,
    shape: &MachineShape,
) -> Result<(), String> {
    let header = LogHeader {
        format_version: LOG_FORMAT_VERSION,
        shape: shape.clone(),
        disk_reads: me.disk_reads,
        disk_root: hello.disk_root,
        cluster: me.cluster.clone(),
        epoch,
        first_index: 1,
        start_ordinal: hello.position.ordinal,
    };
    let as_follower = Hello {
        position: crate::ft::proto::Position {
            received: 0,
            ordinal: hello.position.ordinal,
        },
        ..hello.clone()
    };
    check_hello(me, cert_name, &as_follower, epoch, &header)
}

/// The backup's checks of the primary's welcome. `epoch` is the epoch this
/// node last stored; `shape` and `disk_root` describe this machine now.
pub fn check_welcome(
    me: &Identity,
    welcome: &Welcome,
    epoch: u64,
    shape: &MachineShape,
    disk_root: &Option<[u8; 32]>,
    received: u64,
) -> Result<(), String> {
    if welcome.node != me.peer {
        return Err(format!(
            "the primary calls itself {:?}, this node's configured peer is {:?}",
            welcome.node, me.peer
        ));
    }
    let h = &welcome.header;
    if h.cluster != me.cluster {
        return Err(format!(
            "the primary's log is for cluster {:?}, this node is in {:?}",
            h.cluster, me.cluster
        ));
    }
    if welcome.epoch < epoch {
        return Err(format!(
            "the primary is at epoch {}, but this node has already seen epoch {epoch}: refusing a stale primary",
            welcome.epoch
        ));
    }
    if let Some(why) = shape.mismatch(&h.shape, "the primary") {
        return Err(why);
    }
    if h.disk_reads != me.disk_reads {
        return Err(format!(
            "the primary logs disk_reads = {:?}, this node is configured for {:?}",
            h.disk_reads.name(),
            me.disk_reads.name()
        ));
    }
    if received == 0 && h.disk_root != *disk_root {
        return Err(format!(
            "the disks differ: the primary's log starts from a disk with root {}, this disk's root is {}",
            root_text(&h.disk_root),
            root_text(disk_root)
        ));
    }
    if welcome.resume_from != received + 1 {
        return Err(format!(
            "the primary resumes at entry {}, but this node has received up to {received}",
            welcome.resume_from
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ft::proto::Position;

    fn shape() -> MachineShape {
        MachineShape {
            image_hash: [1; 32],
            memory_size: 64 << 20,
            cmdline: "x".into(),
            net_mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            disk: None,
        }
    }

    fn header() -> LogHeader {
        LogHeader {
            format_version: LOG_FORMAT_VERSION,
            shape: shape(),
            disk_reads: DiskReads::Ship,
            disk_root: Some([9; 32]),
            cluster: "lab".into(),
            epoch: 1,
            first_index: 1,
            start_ordinal: 0,
        }
    }

    fn primary() -> Identity {
        Identity {
            node: "node-a".into(),
            cluster: "lab".into(),
            peer: "node-b".into(),
            disk_reads: DiskReads::Ship,
        }
    }

    fn hello() -> Hello {
        Hello {
            cluster: "lab".into(),
            node: "node-b".into(),
            peer: "node-a".into(),
            epoch: 0,
            log_format: LOG_FORMAT_VERSION,
            shape: shape(),
            disk_root: Some([9; 32]),
            disk_reads: DiskReads::Ship,
            position: Position {
                received: 0,
                ordinal: 0,
            },
            join: crate::ft::proto::JoinRequest::No,
        }
    }

    #[test]
    fn each_mismatch_is_named() {
        let me = primary();
        let h = header();
        assert_eq!(check_hello(&me, "node-b", &hello(), 1, &h), Ok(()));
        let cases: Vec<(Hello, &str, &str)> = vec![
            (hello(), "node-x", "certificate names node \"node-x\""),
            (
                Hello {
                    cluster: "prod".into(),
                    ..hello()
                },
                "node-b",
                "cluster \"prod\"",
            ),
            (
                Hello {
                    disk_root: Some([8; 32]),
                    ..hello()
                },
                "node-b",
                "the disks differ",
            ),
            (
                Hello {
                    epoch: 5,
                    ..hello()
                },
                "node-b",
                "this primary is stale",
            ),
            (
                Hello {
                    log_format: 99,
                    ..hello()
                },
                "node-b",
                "log format 99",
            ),
            (
                Hello {
                    shape: MachineShape {
                        image_hash: [2; 32],
                        ..shape()
                    },
                    ..hello()
                },
                "node-b",
                "guest image",
            ),
            (
                Hello {
                    disk_reads: DiskReads::BackupReads,
                    ..hello()
                },
                "node-b",
                "backup-reads",
            ),
        ];
        for (hl, cert, want) in cases {
            let why = check_hello(&me, cert, &hl, 1, &h).unwrap_err();
            assert!(why.contains(want), "{why:?} should mention {want:?}");
        }
    }

    #[test]
    fn a_backup_refuses_a_stale_primary() {
        let me = Identity {
            node: "node-b".into(),
            peer: "node-a".into(),
            ..primary()
        };
        let w = Welcome {
            node: "node-a".into(),
            epoch: 1,
            header: header(),
            resume_from: 1,
        };
        assert_eq!(
            check_welcome(&me, &w, 1, &shape(), &Some([9; 32]), 0),
            Ok(())
        );
        let why = check_welcome(&me, &w, 2, &shape(), &Some([9; 32]), 0).unwrap_err();
        assert!(why.contains("stale primary"), "{why}");
        let why = check_welcome(&me, &w, 1, &shape(), &Some([7; 32]), 0).unwrap_err();
        assert!(why.contains("disks differ"), "{why}");
    }
}
