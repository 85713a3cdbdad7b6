//! Live replication in the three-site lab (scripts/lab.sh): a primary and a
//! backup of ftkv on real KVM, the log over QUIC with mutual TLS through the
//! WAN relay, a real witness, real Redis clients on the client LAN.

use ftvm_tests::lab::{in_netns, wait_until, Lab, RespConn, Site, HANG};
use ftvm_tests::site;
use std::process::Command;
use std::time::{Duration, Instant};

fn ready(test: &str) -> bool {
    ftvm_tests::kvm_available(test)
        && site::root_available(test)
        && site::tool_available(test, "redis-cli", "redis-tools")
}

const GUEST: &str = "10.0.2.15:6379";

fn ftvm(args: &[&str]) -> String {
    let out = Command::new(ftvm_tests::bin("ftvm"))
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn disk_root(img: &std::path::Path) -> String {
    ftvm_tests::reprotect::disk_root(img).unwrap()
}

#[test]
fn pair_replicates_ftkv_under_load_and_stops_with_identical_disks() {
    if !ready("pair_replicates_ftkv_under_load_and_stops_with_identical_disks") {
        return;
    }
    let mut lab = Lab::up(0).unwrap();
    // Digests often, so the short run crosses many digest points.
    for s in [Site::A, Site::B] {
        let p = lab.config(s);
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(
            &p,
            format!("{text}\n[replay]\ndigest_interval = 512\nfull_digest_every = 4\n"),
        )
        .unwrap();
    }
    lab.start_pair().unwrap();
    assert_eq!(lab.cli(&["SET", "greeting", "hello"]).unwrap(), "OK");
    let bench = lab
        .command("c", "redis-benchmark")
        .args([
            "-h",
            "10.0.2.15",
            "-n",
            "20000",
            "-c",
            "20",
            "-t",
            "set,get,incr",
            "-r",
            "10000",
            "-q",
        ])
        .output()
        .unwrap();
    assert!(
        bench.status.success(),
        "{}",
        String::from_utf8_lossy(&bench.stderr)
    );
    let bench = lab
        .command("c", "redis-benchmark")
        .args([
            "-h",
            "10.0.2.15",
            "-n",
            "20000",
            "-c",
            "20",
            "-P",
            "16",
            "-t",
            "set,mset",
            "-q",
        ])
        .output()
        .unwrap();
    assert!(bench.status.success());
    assert_eq!(lab.cli(&["GET", "greeting"]).unwrap(), "hello");
    let b = lab
        .wait_status(Site::B, "replay to catch up with the primary", |v| {
            v["replay"]["replayed_index"] == v["replay"]["received_index"]
                && v["replay"]["digests_checked"].as_u64() > Some(10)
        })
        .unwrap();
    assert!(b["divergence"].is_null(), "{b}");
    assert!(b["replay"]["outputs_checked"].as_u64() > Some(1000), "{b}");
    let a = lab.status(Site::A).unwrap();
    assert_eq!(a["role"], "primary");
    assert_eq!(a["protected"], true, "{a}");
    assert!(a["replication_stopped"].is_null());

    // A clean stop of the primary ends the log; the backup stops at the
    // same exit, with the same summary and byte-identical disks.
    lab.stop_pair_cleanly(Site::A).unwrap();
}

/// Round-trip times of `n` PINGs on one connection from the client LAN.
fn ping_times(lab: &Lab, n: usize) -> Vec<Duration> {
    in_netns(&lab.ns("c"), move || {
        let mut c = RespConn::connect(GUEST)?;
        let mut times = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            assert_eq!(c.call(&["PING"])?, "+PONG");
            times.push(t.elapsed());
        }
        Ok(times)
    })
    .unwrap()
}

#[test]
fn output_rule_holds_each_reply_for_the_backup_round_trip() {
    if !ready("output_rule_holds_each_reply_for_the_backup_round_trip") {
        return;
    }
    let mut lab = Lab::up(20).unwrap();
    lab.start_pair().unwrap();
    // 20 ms each way between the sites: no reply can leave before the log
    // entry it depends on went to the backup and its ack came back.
    let times = ping_times(&lab, 30);
    let min = times.iter().min().unwrap();
    assert!(
        *min >= Duration::from_millis(40),
        "a reply came back in {min:?}, faster than one site round trip (40 ms)"
    );

    // With the backup's acks cut at the relay, no reply leaves at all...
    let mut conn = in_netns(&lab.ns("c"), || RespConn::connect(GUEST)).unwrap();
    assert_eq!(conn.call(&["SET", "k", "before"]).unwrap(), "+OK");
    lab.relay(&["block", "b-to-a", "fwd"]).unwrap();
    conn.send(&["SET", "k", "during"]).unwrap();
    assert_eq!(
        conn.reply(Duration::from_secs(3)).unwrap(),
        None,
        "a reply left while the backup could not ack"
    );
    let a = lab.status(Site::A).unwrap();
    assert!(a["held_outputs"]["frames"].as_u64() > Some(0), "{a}");
    // ...and it comes once acks flow again.
    lab.relay(&["unblock", "b-to-a", "fwd"]).unwrap();
    assert_eq!(conn.reply(HANG).unwrap().as_deref(), Some("+OK"));
    assert_eq!(conn.call(&["GET", "k"]).unwrap(), "during");
}

#[test]
fn a_corrupted_log_frame_ends_the_connection_and_is_never_replayed() {
    if !ready("a_corrupted_log_frame_ends_the_connection_and_is_never_replayed") {
        return;
    }
    let mut lab = Lab::up(0).unwrap();
    lab.start_witness().unwrap();
    lab.start_node_env(
        Site::A,
        &["--primary"],
        &[("FTVM_TEST_CORRUPT_LOG_FRAME", "20")],
    )
    .unwrap();
    lab.start_node(Site::B, &[]).unwrap();
    lab.wait_for_ping().unwrap();
    for i in 0..200 {
        assert_eq!(lab.cli(&["SET", &format!("k{i}"), "v"]).unwrap(), "OK");
    }
    let (_, b_err) = lab.node_output(Site::B);
    assert!(b_err.contains("bad frame from the primary"), "{b_err}");
    assert!(b_err.contains("checksum"), "{b_err}");
    let b = lab
        .wait_status(Site::B, "a second session", |v| {
            v["peer"]["sessions"].as_u64() >= Some(2)
        })
        .unwrap();
    assert!(b["divergence"].is_null(), "{b}");
    // Nothing of the bad frame was replayed: the pair ends identical.
    assert_eq!(lab.stop_node(Site::A, libc::SIGTERM).unwrap(), Some(0));
    assert_eq!(lab.wait_node(Site::B).unwrap(), Some(0));
    let (b_out, _) = lab.node_output(Site::B);
    assert!(b_out.contains("replay: OK"), "{b_out}");
    assert_eq!(
        disk_root(&lab.dir.join("node-a.img")),
        disk_root(&lab.dir.join("node-b.img"))
    );
}

/// Starts B with its config changed by `change`, expects it to be refused
/// with a reason containing `want` on both sides.
fn refused(lab: &mut Lab, case: &str, want: &str, change: impl FnOnce(&Lab)) {
    let orig = std::fs::read_to_string(lab.config(Site::B)).unwrap();
    change(lab);
    lab.set_ft(Site::B, "state_dir", &format!("\"state-{case}\""))
        .unwrap();
    lab.start_node(Site::B, &[]).unwrap();
    let code = lab.wait_node(Site::B).unwrap();
    let (_, b_err) = lab.node_output(Site::B);
    assert_eq!(code, Some(1), "{case}: {b_err}");
    assert!(
        b_err.contains("pairing refused") && b_err.contains(want),
        "{case}: the backup does not say {want:?}: {b_err}"
    );
    let (_, a_err) = lab.node_output(Site::A);
    assert!(
        a_err.contains("refusing pairing") && a_err.contains(want),
        "{case}: the primary does not say {want:?}: {a_err}"
    );
    std::fs::write(lab.config(Site::B), orig).unwrap();
}

#[test]
fn refused_pairings_say_why_on_both_sides() {
    if !ready("refused_pairings_say_why_on_both_sides") {
        return;
    }
    let mut lab = Lab::up(0).unwrap();
    lab.start_witness().unwrap();
    lab.start_node(Site::A, &["--primary"]).unwrap();
    lab.wait_status(Site::A, "primary", |v| v["role"] == "primary")
        .unwrap();
    let dir = lab.dir.clone();

    // Different disk contents.
    let other_disk = dir.join("other.img");
    std::fs::copy(dir.join("node-b.img"), &other_disk).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&other_disk)
        .and_then(|f| std::os::unix::fs::FileExt::write_at(&f, b"x", 4096))
        .unwrap();
    refused(&mut lab, "disk", "the disks differ", |lab| {
        let p = lab.config(Site::B);
        let t = std::fs::read_to_string(&p).unwrap();
        std::fs::write(
            &p,
            t.replace("path = \"node-b.img\"", "path = \"other.img\""),
        )
        .unwrap();
    });

    // A different guest image (one byte more).
    let mut image = std::fs::read(site::ftkv_image()).unwrap();
    image.push(0);
    std::fs::write(dir.join("other-ftkv"), image).unwrap();
    refused(&mut lab, "image", "guest image", |lab| {
        let p = lab.config(Site::B);
        let t = std::fs::read_to_string(&p).unwrap();
        let image = t
            .lines()
            .find(|l| l.starts_with("image = "))
            .unwrap()
            .to_string();
        std::fs::write(&p, t.replace(&image, "image = \"other-ftkv\"")).unwrap();
    });

    // The wrong cluster.
    refused(&mut lab, "cluster", "cluster \"other\"", |lab| {
        lab.set_ft(Site::B, "cluster", "\"other\"").unwrap();
    });

    // A certificate that names another node than the config says.
    ftvm(&[
        "certs",
        "issue",
        "--dir",
        dir.join("pki").to_str().unwrap(),
        "--node",
        "node-c",
    ]);
    refused(
        &mut lab,
        "name",
        "certificate names node \"node-c\"",
        |lab| {
            lab.set_ft(Site::B, "cert", "\"pki/node-c.pem\"").unwrap();
            lab.set_ft(Site::B, "key", "\"pki/node-c.key\"").unwrap();
        },
    );

    // A certificate from another CA: the TLS handshake fails on both sides.
    let pki2 = dir.join("pki2");
    ftvm(&["certs", "init", "--dir", pki2.to_str().unwrap()]);
    ftvm(&[
        "certs",
        "issue",
        "--dir",
        pki2.to_str().unwrap(),
        "--node",
        "node-b",
    ]);
    let orig = std::fs::read_to_string(lab.config(Site::B)).unwrap();
    lab.set_ft(Site::B, "ca", "\"pki2/ca.pem\"").unwrap();
    lab.set_ft(Site::B, "cert", "\"pki2/node-b.pem\"").unwrap();
    lab.set_ft(Site::B, "key", "\"pki2/node-b.key\"").unwrap();
    lab.set_ft(Site::B, "state_dir", "\"state-ca\"").unwrap();
    lab.start_node(Site::B, &[]).unwrap();
    wait_until("both sides to report the failed handshake", || {
        let (_, b_err) = lab.node_output(Site::B);
        let (_, a_err) = lab.node_output(Site::A);
        Ok(b_err.contains("cannot reach the primary")
            && b_err.to_lowercase().contains("certificate")
            && a_err.contains("handshake failed"))
    })
    .unwrap();
    assert_eq!(lab.stop_node(Site::B, libc::SIGTERM).unwrap(), Some(0));
    std::fs::write(lab.config(Site::B), orig).unwrap();

    // A protocol version from the future, from a hand-made backup.
    let reply = future_hello(&lab).unwrap();
    assert!(reply.contains("protocol version 99"), "{reply}");
    let (_, a_err) = lab.node_output(Site::A);
    assert!(a_err.contains("protocol version 99"), "{a_err}");

    // Through all of it the primary kept running its guest.
    assert!(lab.node(Site::A).unwrap().is_running());
    let a = lab.status(Site::A).unwrap();
    assert_eq!(a["role"], "primary", "{a}");
}

/// Connects to A as node-b and sends a Hello claiming protocol version 99;
/// returns the refusal reason A answered with.
fn future_hello(lab: &Lab) -> anyhow::Result<String> {
    use ftvm_appliance::ft::proto::{self, Control, Hello, JoinRequest, Position, FRAME_CONTROL};
    use ftvm_appliance::replay::log::{DiskReads, MachineShape, LOG_FORMAT_VERSION};
    use ftvm_transport::quic::{self, QuicOptions, TlsFiles, ALPN_LOG};
    let pki = lab.dir.join("pki");
    in_netns(&lab.ns("b"), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let tls = TlsFiles {
                ca: pki.join("ca.pem"),
                cert: pki.join("node-b.pem"),
                key: pki.join("node-b.key"),
            };
            let cfg = quic::client_config(&tls, &[ALPN_LOG], &QuicOptions::default())?;
            let ep = quic::client_endpoint("0.0.0.0:0".parse()?, cfg)?;
            let conn = quic::connect(
                &ep,
                "10.77.2.1:7401".parse()?,
                "node-a",
                Duration::from_secs(30),
            )
            .await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            let hello = Control::Hello(Hello {
                cluster: "lab".into(),
                node: "node-b".into(),
                peer: "node-a".into(),
                epoch: 0,
                log_format: LOG_FORMAT_VERSION,
                shape: MachineShape {
                    image_hash: [0; 32],
                    memory_size: 0,
                    cmdline: String::new(),
                    net_mac: None,
                    disk: None,
                },
                disk_root: None,
                disk_reads: DiskReads::Ship,
                position: Position {
                    received: 0,
                    ordinal: 0,
                },
                join: JoinRequest::No,
            });
            let payload = proto::encode_as(99, &hello)?;
            ftvm_transport::frame::write_frame_async(&mut send, FRAME_CONTROL, &payload, 65536)
                .await?;
            let f = ftvm_transport::frame::read_frame_async(&mut recv, 65536)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no answer"))?;
            match proto::decode(&f.payload)? {
                Control::Refused { reason } => Ok(reason),
                other => anyhow::bail!("expected a refusal, got {other:?}"),
            }
        })
    })
}

/// Fills site A's disk with an ftkv log of about `mib` MiB (ftkv alone, no
/// pair), then gives site B a copy: both sites boot from a large log, a
/// read-heavy start.
fn fill_disks(lab: &Lab, mib: u64) {
    let solo = lab.dir.join("solo-a.toml");
    let cfg = std::fs::read_to_string(lab.config(Site::A)).unwrap();
    let machine_part = cfg.split("\n[ft]").next().unwrap();
    std::fs::write(&solo, machine_part).unwrap();
    let vm = site::Guard::spawn(
        lab.command("a", ftvm_tests::bin("ftvm"))
            .args(["run", "--config", solo.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )
    .unwrap();
    lab.wait_for_ping().unwrap();
    let n = (mib << 20) / 1000;
    let out = lab
        .command("c", "redis-benchmark")
        .args([
            "-h",
            "10.0.2.15",
            "-t",
            "set",
            "-d",
            "1000",
            "-r",
            "100000000",
            "-c",
            "20",
            "-P",
            "8",
            "-q",
        ])
        .args(["-n", &n.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success());
    vm.signal(libc::SIGTERM);
    assert!(vm.wait_status().unwrap().success());
    std::fs::copy(lab.dir.join("node-a.img"), lab.dir.join("node-b.img")).unwrap();
}

#[test]
fn backup_reads_replicate_a_read_heavy_boot_and_catch_a_corrupt_backup_disk() {
    if !ready("backup_reads_replicate_a_read_heavy_boot_and_catch_a_corrupt_backup_disk") {
        return;
    }
    let mut lab = Lab::up(0).unwrap();
    fill_disks(&lab, 16);
    let keep = tempfile::tempdir().unwrap();
    let pristine = keep.path().join("filled.img");
    std::fs::copy(lab.dir.join("node-a.img"), &pristine).unwrap();
    for s in [Site::A, Site::B] {
        lab.set_ft(s, "disk_reads", "\"backup-reads\"").unwrap();
    }
    // A read-heavy start (ftkv reads its 16 MiB log at boot) replicates.
    lab.start_pair().unwrap();
    let keys: u64 = lab.cli(&["DBSIZE"]).unwrap().parse().unwrap();
    assert!(keys > 10_000, "{keys} keys after boot");
    let a = lab.status(Site::A).unwrap();
    let log_bytes = a["log"]["bytes"].as_u64().unwrap();
    assert!(
        log_bytes < 4 << 20,
        "with backup-reads the 16 MiB read at boot put {log_bytes} bytes in the log"
    );
    let b = lab
        .wait_status(Site::B, "replay to catch up", |v| {
            v["replay"]["replayed_index"] == v["replay"]["received_index"]
        })
        .unwrap();
    assert!(b["divergence"].is_null(), "{b}");
    assert_eq!(lab.stop_node(Site::A, libc::SIGTERM).unwrap(), Some(0));
    assert_eq!(lab.wait_node(Site::B).unwrap(), Some(0));
    drop(lab);

    // Same again, but the backup's disk rots after it opened it: the first
    // read of that chunk is a divergence naming the sectors.
    let mut lab = Lab::up(0).unwrap();
    for s in [Site::A, Site::B] {
        std::fs::copy(&pristine, lab.dir.join(format!("node-{}.img", s.letter()))).unwrap();
        lab.set_ft(s, "disk_reads", "\"backup-reads\"").unwrap();
    }
    lab.start_witness().unwrap();
    lab.start_node(Site::B, &[]).unwrap();
    wait_until("the backup to open its disk and dial", || {
        Ok(lab.node_output(Site::B).1.contains("dialling the primary"))
    })
    .unwrap();
    let offset = 3 << 20; // inside the ftkv log, which starts at byte 512
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(lab.dir.join("node-b.img"))
        .unwrap();
    std::os::unix::fs::FileExt::write_at(&f, &[0xA5; 512], offset).unwrap();
    drop(f);
    lab.start_node(Site::A, &["--primary"]).unwrap();
    let b = lab
        .wait_status(Site::B, "a divergence", |v| !v["divergence"].is_null())
        .unwrap();
    let what = b["divergence"]["what"].as_str().unwrap();
    assert!(what.contains("disk read of sectors"), "{what}");
    // The reported byte range covers the rotten sector.
    let range = what.split("(bytes ").nth(1).unwrap();
    let (from, to) = range.split_once("..").unwrap();
    let from: u64 = from.parse().unwrap();
    let to: u64 = to.split(')').next().unwrap().parse().unwrap();
    assert!(from <= offset && offset < to, "{what}");
    assert_eq!(b["role"], "fenced", "{b}");
    let a = lab
        .wait_status(Site::A, "replication stopped", |v| {
            !v["replication_stopped"].is_null()
        })
        .unwrap();
    assert!(
        a["replication_stopped"]
            .as_str()
            .unwrap()
            .contains("diverged"),
        "{a}"
    );
}
