//! ftkv, the reference guest, serving real Redis clients (`redis-cli`,
//! `redis-benchmark` from Debian's redis-tools) from a VM on real KVM, with a
//! TAP device in a network namespace and a disk image.

use ftvm_tests::site::{self, FtkvSite, Guard, GUEST_IP};
use std::io::Write;
use std::time::Duration;

use site::ftkv_ready as ready;

/// A fresh site with a 64 MiB disk, VM not started.
fn site(prefix: &str, dir: &std::path::Path) -> FtkvSite {
    FtkvSite::with_new_disk(prefix, dir).unwrap()
}

/// One redis-cli connection in the site's namespace, reading commands from
/// its stdin.
fn spawn_cli(s: &FtkvSite) -> std::process::Child {
    s.spawn_cli(&[]).unwrap()
}

/// Feeds `commands` (one per line) to one redis-cli connection; its reply lines.
fn pipe_cli(s: &FtkvSite, commands: &str) -> Vec<String> {
    s.pipe_cli(&[], commands).unwrap()
}

#[test]
fn round_trips_and_64_concurrent_counters() {
    if !ready("round_trips_and_64_concurrent_counters") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = site("ftkv-rt", dir.path());
    s.start(&["run"]).unwrap();

    assert_eq!(s.cli(&["SET", "greeting", "hello world"]).unwrap(), "OK");
    assert_eq!(s.cli(&["GET", "greeting"]).unwrap(), "hello world");
    assert_eq!(s.cli(&["INCR", "n"]).unwrap(), "1");
    assert_eq!(s.cli(&["INCRBY", "n", "41"]).unwrap(), "42");
    assert_eq!(s.cli(&["MSET", "a", "1", "b", "2"]).unwrap(), "OK");
    // redis-cli prints a nil as an empty line; `cli` trims the end.
    assert_eq!(s.cli(&["MGET", "a", "b", "nope"]).unwrap(), "1\n2");
    assert_eq!(s.cli(&["DEL", "a", "b", "nope"]).unwrap(), "2");
    assert_eq!(s.cli(&["EXISTS", "a"]).unwrap(), "0");
    assert!(s
        .cli(&["INCR", "greeting"])
        .unwrap()
        .contains("not an integer"));
    assert!(s
        .cli(&["NOSUCHCOMMAND"])
        .unwrap()
        .contains("unknown command"));

    // 64 connections, each 1,000 increments spread over four shared counters.
    let script: String = (0..1000).map(|i| format!("INCR c{}\n", i % 4)).collect();
    let clients: Vec<_> = (0..64)
        .map(|_| {
            let mut child = spawn_cli(&s);
            let mut stdin = child.stdin.take().unwrap();
            let text = script.clone();
            let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
            (child, writer)
        })
        .collect();
    for (child, writer) in clients {
        writer.join().unwrap().unwrap();
        let out = child.wait_with_output().unwrap();
        let replies = String::from_utf8_lossy(&out.stdout);
        assert_eq!(replies.lines().count(), 1000, "every increment answered");
        assert!(
            replies.lines().all(|l| l.parse::<u64>().is_ok()),
            "{replies}"
        );
    }
    for c in 0..4 {
        assert_eq!(s.cli(&["GET", &format!("c{c}")]).unwrap(), "16000", "c{c}");
    }
    s.stop().unwrap();
}

#[test]
fn acknowledged_writes_survive_power_off_and_sigkill() {
    if !ready("acknowledged_writes_survive_power_off_and_sigkill") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = site("ftkv-dur", dir.path());

    // A clean power-off and a second boot on the same disk.
    s.start(&["run"]).unwrap();
    let script: String = (0..500).map(|i| format!("SET clean{i} v{i}\n")).collect();
    assert!(pipe_cli(&s, &script).iter().all(|l| l == "OK"));
    s.stop().unwrap();
    s.start(&["run"]).unwrap();
    let gets: String = (0..500).map(|i| format!("GET clean{i}\n")).collect();
    let back = pipe_cli(&s, &gets);
    for (i, v) in back.iter().enumerate() {
        assert_eq!(v, &format!("v{i}"), "clean{i} after power-off");
    }
    assert_eq!(back.len(), 500);

    // SIGKILL under a write load from four clients.
    let writers: Vec<_> = (0..4)
        .map(|c| {
            let mut child = spawn_cli(&s);
            let mut stdin = child.stdin.take().unwrap();
            let text: String = (0..200_000)
                .map(|i| format!("SET w{c}-{i} x{i}\n"))
                .collect();
            std::thread::spawn(move || {
                let _ = stdin.write_all(text.as_bytes());
            });
            Guard { child: Some(child) }
        })
        .collect();
    std::thread::sleep(Duration::from_millis(2500));
    s.kill();
    // The VM is gone without a word on the wire: end the clients too, keeping
    // what they printed (each OK is an acknowledged write, in order).
    std::thread::sleep(Duration::from_millis(300));
    for w in &writers {
        // `timeout` passes SIGTERM on to its redis-cli.
        w.signal(libc::SIGTERM);
    }
    let mut acked = Vec::new();
    for w in writers {
        let out = w.wait_output().unwrap();
        let oks = String::from_utf8_lossy(&out.stdout)
            .lines()
            .take_while(|l| *l == "OK")
            .count();
        acked.push(oks);
    }
    assert!(acked.iter().sum::<usize>() > 0, "no write was acknowledged");

    s.start(&["run"]).unwrap();
    for (c, &n) in acked.iter().enumerate() {
        let gets: String = (0..n).map(|i| format!("GET w{c}-{i}\n")).collect();
        let back = pipe_cli(&s, &gets);
        assert_eq!(back.len(), n);
        for (i, v) in back.iter().enumerate() {
            assert_eq!(
                v,
                &format!("x{i}"),
                "acknowledged w{c}-{i} lost after SIGKILL"
            );
        }
    }
    let console = std::fs::read_to_string(dir.path().join("console.log")).unwrap();
    assert!(console.contains("replayed"), "boot log: {console}");
    assert!(!console.to_lowercase().contains("panic"), "{console}");
    s.stop().unwrap();
}

#[test]
fn redis_benchmark_completes_without_errors() {
    if !ready("redis_benchmark_completes_without_errors")
        || !site::tool_available(
            "redis_benchmark_completes_without_errors",
            "redis-benchmark",
            "redis-tools",
        )
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = site("ftkv-bench", dir.path());
    s.start(&["run"]).unwrap();
    for pipeline in ["1", "16"] {
        let out =
            s.ns.command("timeout")
                .args([
                    "300",
                    "redis-benchmark",
                    "-h",
                    GUEST_IP,
                    "-t",
                    "set,get",
                    "-n",
                    "100000",
                    "-c",
                    "50",
                    "-q",
                    "-P",
                    pipeline,
                ])
                .output()
                .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "-P {pipeline}: {text}\n{err}");
        assert!(
            text.contains("SET: ") && text.contains("GET: "),
            "-P {pipeline}: {text}"
        );
        assert!(
            !text.to_lowercase().contains("error") && !err.to_lowercase().contains("error"),
            "{text}{err}"
        );
    }
    assert_eq!(s.cli(&["PING"]).unwrap(), "PONG");
    s.stop().unwrap();
}

#[test]
fn hostile_clients_leave_ftkv_serving() {
    if !ready("hostile_clients_leave_ftkv_serving")
        || !site::tool_available("hostile_clients_leave_ftkv_serving", "python3", "python3")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = site("ftkv-bad", dir.path());
    s.start(&["run"]).unwrap();
    // A well-behaved client holds a connection open throughout.
    let mut good = spawn_cli(&s);
    let mut good_in = good.stdin.take().unwrap();
    good_in.write_all(b"SET survivor yes\n").unwrap();

    let out =
        s.ns.command("timeout")
            .args(["300", "python3"])
            .arg(ftvm_tests::repo_root().join("tests/clients/hostile.py"))
            .arg(GUEST_IP)
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    good_in.write_all(b"GET survivor\n").unwrap();
    drop(good_in);
    let replies = good.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&replies.stdout), "OK\nyes\n");
    assert_eq!(s.cli(&["SET", "after", "1"]).unwrap(), "OK");
    assert_eq!(s.cli(&["GET", "after"]).unwrap(), "1");
    s.stop().unwrap();
}

#[test]
fn network_and_disk_traffic_replays_and_a_flipped_frame_diverges() {
    if !ready("network_and_disk_traffic_replays_and_a_flipped_frame_diverges") {
        return;
    }
    use ftvm_appliance::replay::env::Input;
    use ftvm_appliance::replay::log::{self, Entry};
    let dir = tempfile::tempdir().unwrap();
    let mut s = site("ftkv-rr", dir.path());
    let start_copy = dir.path().join("start.img");
    std::fs::copy(dir.path().join("ftkv.img"), &start_copy).unwrap();
    // A state digest every 8 exits, so a divergence is reported close to its cause.
    let mut cfg_text = std::fs::read_to_string(&s.config).unwrap();
    cfg_text.push_str("[replay]\ndigest_interval = 8\n");
    std::fs::write(&s.config, cfg_text).unwrap();
    let log_path = dir.path().join("ftkv.ftlog");
    s.start(&["record", "--log", log_path.to_str().unwrap()])
        .unwrap();
    let script: String = (0..300)
        .map(|i| format!("SET k{i} {}\nINCR n\n", "v".repeat(i + 1)))
        .collect();
    let replies = pipe_cli(&s, &script);
    assert_eq!(replies.len(), 600);
    let (record, root) = site::record_summary(&s.stop().unwrap()).unwrap();
    let replay =
        |log: &std::path::Path, disk: &std::path::Path| site::replay(&s.config, log, disk).unwrap();
    let replay_disk = dir.path().join("replay.img");
    std::fs::copy(&start_copy, &replay_disk).unwrap();
    let out = replay(&log_path, &replay_disk);
    assert!(
        out.contains(&record.replace("record: ", "replay: OK ")),
        "{out}\nrecorded: {record}"
    );
    assert!(out.contains(&root), "{out}\nrecorded: {root}");

    // Flip the first payload byte of a TCP segment a client sent to ftkv
    // (frames the guest ignores, such as the host's IPv6 chatter, would
    // rightly change nothing).
    let (h, mut entries) = log::read_all(&log_path).unwrap();
    let mut flipped = None;
    'outer: for e in entries.iter_mut() {
        if let Entry::Exit {
            ordinal, inputs, ..
        } = e
        {
            for i in inputs.iter_mut() {
                if let Input::NetRx(frame) = i {
                    if let Some(at) = tcp_payload_to_port(frame, 6379) {
                        frame[at] ^= 0x20;
                        flipped = Some(*ordinal);
                        break 'outer;
                    }
                }
            }
        }
    }
    let at = flipped.expect("a received frame with payload");
    let bad = dir.path().join("flipped.ftlog");
    log::write_all(&bad, &h, &entries).unwrap();
    std::fs::copy(&start_copy, &replay_disk).unwrap();
    let out = replay(&bad, &replay_disk);
    let line = out.lines().find(|l| l.starts_with("replay: ")).unwrap();
    assert!(line.starts_with("replay: DIVERGED at exit "), "{line}");
    let n: u64 = line["replay: DIVERGED at exit ".len()..]
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        n >= at,
        "divergence {n} reported before the flipped frame at {at}"
    );
    assert!(
        n <= at + 8,
        "divergence at {n} is more than one digest interval after the flipped frame at {at}: {line}"
    );
}

/// Offset of the first TCP payload byte of an IPv4 frame to `port`, if any.
fn tcp_payload_to_port(frame: &[u8], port: u16) -> Option<usize> {
    if frame.len() < 54 || frame[12..14] != [0x08, 0x00] || frame[23] != 6 {
        return None;
    }
    let ip_len = usize::from(frame[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let tcp = 14 + ip_len;
    if frame.len() < tcp + 20 || u16::from_be_bytes([frame[tcp + 2], frame[tcp + 3]]) != port {
        return None;
    }
    let payload = tcp + usize::from(frame[tcp + 12] >> 4) * 4;
    (payload < 14 + total && payload < frame.len()).then_some(payload)
}
