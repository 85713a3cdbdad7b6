//! The ftkv compatibility matrix: real Redis clients, as users get them
//! today, against ftkv in a VM on real KVM (TAP in a network namespace):
//!
//! | client | protocol |
//! |---|---|
//! | redis-py (latest from PyPI, scripts/setup.sh) | default settings: RESP3 (HELLO 3) |
//! | redis-py | `protocol=2` |
//! | `redis-cli -3`, `redis-cli -2` (Debian's redis-tools) | RESP3, RESP2 |
//! | Rust `redis` crate, async multiplexed connection | RESP2 (its default) and RESP3 |
//!
//! Each runs connect, SET/GET/INCR/MSET/MGET/DEL/EXPIRE, pipelining and
//! transactions (redis-py's default `r.pipeline()`, `r.transaction()` with
//! WATCH; the Rust crate's `redis::pipe().atomic()`). A crash test kills
//! the VM under a stream of transactions and checks each is all or
//! nothing after the restart. The redis-py checks live in
//! `tests/clients/redis_py_check.py`.

use ftvm_tests::site::{self, FtkvSite, Guard, GUEST_IP};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// A fresh site with its VM started under `ftvm <args>`.
fn started(prefix: &str, dir: &Path, args: &[&str]) -> FtkvSite {
    let mut s = FtkvSite::with_new_disk(prefix, dir).unwrap();
    s.start(args).unwrap();
    s
}

/// `timeout 600 python redis_py_check.py GUEST_IP <mode> [extra...]` in
/// the site's namespace.
fn redis_py_command(
    s: &FtkvSite,
    python: &Path,
    mode: &str,
    extra: &[&str],
) -> std::process::Command {
    let script = ftvm_tests::repo_root().join("tests/clients/redis_py_check.py");
    let mut cmd = s.ns.command("timeout");
    cmd.arg("600")
        .arg(python)
        .arg(script)
        .args([GUEST_IP, mode])
        .args(extra);
    cmd
}

/// Runs `redis_py_check.py GUEST_IP <mode> [extra...]` with `python` in the
/// site's namespace; fails the test with its output unless it passed.
fn redis_py(s: &FtkvSite, python: &Path, mode: &str, extra: &[&str]) -> String {
    let out = redis_py_command(s, python, mode, extra).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "redis_py_check.py {mode} {extra:?} failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("ok: {mode}")), "{stdout}");
    stdout
}

/// Stops the VM and checks the guest never panicked.
fn stop_clean(mut s: FtkvSite, dir: &Path) {
    s.stop().unwrap();
    let console = std::fs::read_to_string(dir.join("console.log")).unwrap();
    assert!(!console.to_lowercase().contains("panic"), "{console}");
}

fn python_ready(test: &str) -> Option<PathBuf> {
    if !site::ftkv_ready(test) {
        return None;
    }
    site::python_with_redis(test)
}

#[test]
fn redis_py_default_settings_speak_resp3() {
    let Some(python) = python_ready("redis_py_default_settings_speak_resp3") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = started("ftkv-py3", dir.path(), &["run"]);
    let basic = redis_py(&s, &python, "basic", &[]);
    assert!(basic.contains("ok: basic RESP3"), "{basic}");
    redis_py(&s, &python, "concurrent", &[]);
    redis_py(&s, &python, "transactions", &[]);
    redis_py(&s, &python, "hostile", &[]);
    // HELLO 3 then GET missing is `_`, HELLO 2 the RESP2 array, HELLO 4 -NOPROTO.
    redis_py(&s, &python, "raw", &[]);
    stop_clean(s, dir.path());
}

#[test]
fn redis_py_with_protocol_2() {
    let Some(python) = python_ready("redis_py_with_protocol_2") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = started("ftkv-py2", dir.path(), &["run"]);
    let basic = redis_py(&s, &python, "basic", &["--protocol", "2"]);
    assert!(basic.contains("ok: basic RESP2"), "{basic}");
    redis_py(&s, &python, "concurrent", &["--protocol", "2"]);
    redis_py(&s, &python, "transactions", &["--protocol", "2"]);
    stop_clean(s, dir.path());
}

/// `(integer) N` with 0 < N <= 100.
fn ttl_within_100(line: &str) -> bool {
    line.strip_prefix("(integer) ")
        .and_then(|n| n.parse::<i64>().ok())
        .is_some_and(|n| (1..=100).contains(&n))
}

#[test]
fn redis_cli_in_resp3_and_resp2() {
    if !site::ftkv_ready("redis_cli_in_resp3_and_resp2") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = started("ftkv-cli", dir.path(), &["run"]);
    let script = "SET a 1\nGET a\nGET missing\nINCR n\nINCR n\nMSET x 1 y 2\nMGET x y zz\n\
                  DEL x y zz\nEXPIRE a 100\nTTL a\nEXPIRE missing 5\nCONFIG GET appendfsync\n\
                  HELLO\nDEL n\n";
    let common = [
        "OK",
        "\"1\"",
        "(nil)",
        "(integer) 1",
        "(integer) 2",
        "OK",
        "1) \"1\"",
        "2) \"2\"",
        "3) (nil)",
        "(integer) 2",
        "(integer) 1",
        // TTL: at most 100 s (less if the host stalled since EXPIRE).
        "TTL",
        "(integer) 0",
    ];
    let matches_common = |out: &[String]| {
        out.len() > common.len()
            && common
                .iter()
                .zip(out)
                .all(|(want, got)| *want == got || (*want == "TTL" && ttl_within_100(got)))
    };
    // RESP3: maps print as `n# key => value`.
    let out = s.pipe_cli(&["-3", "--no-raw"], script).unwrap();
    assert!(matches_common(&out), "{out:#?}");
    let rest = &out[common.len()..];
    assert_eq!(rest[0], "1# \"appendfsync\" => \"always\"", "{out:#?}");
    assert_eq!(rest[1], "1# \"server\" => \"redis\"", "{out:#?}");
    assert!(
        rest.contains(&"3# \"proto\" => (integer) 3".to_string()),
        "{out:#?}"
    );
    assert_eq!(rest.last().map(String::as_str), Some("(integer) 1"));
    // RESP2: the same map is a flat array.
    let out = s.pipe_cli(&["-2", "--no-raw"], script).unwrap();
    assert!(matches_common(&out), "{out:#?}");
    let rest = &out[common.len()..];
    assert_eq!(
        rest[..2],
        ["1) \"appendfsync\"", "2) \"always\""],
        "{out:#?}"
    );
    assert_eq!(rest[2], " 1) \"server\"", "{out:#?}");
    assert!(rest.contains(&" 6) (integer) 2".to_string()), "{out:#?}");

    // Pipelining: redis-cli --pipe sends 20,000 commands without waiting.
    let mass: String = (0..10_000)
        .map(|i| format!("SET p{i} {i}\r\nINCR pc\r\n"))
        .collect();
    let out = s.pipe_cli(&["--pipe"], &mass).unwrap().join("\n");
    assert!(out.contains("errors: 0, replies: 20000"), "{out}");
    for proto in ["-3", "-2"] {
        let gets: String = (0..10_000).map(|i| format!("GET p{i}\n")).collect();
        let back = s.pipe_cli(&[proto], &gets).unwrap();
        assert_eq!(back.len(), 10_000);
        for (i, v) in back.iter().enumerate() {
            assert_eq!(v, &i.to_string(), "p{i} with redis-cli {proto}");
        }
    }
    assert_eq!(s.cli(&["-3", "GET", "pc"]).unwrap(), "10000");
    stop_clean(s, dir.path());
}

/// `redis::pipe().atomic()`: MULTI, SET key value, GET key, EXEC. `None`
/// when EXEC answered nil (a WATCHed key changed).
async fn set_and_get_atomically(
    con: &mut redis::aio::MultiplexedConnection,
    key: &str,
    value: &str,
) -> redis::RedisResult<Option<(String,)>> {
    redis::pipe()
        .atomic()
        .set(key, value)
        .ignore()
        .get(key)
        .query_async(con)
        .await
}

/// The Rust `redis` crate's async multiplexed connection, in RESP2 (the
/// crate's default) and RESP3: one connection shared by concurrent tasks.
async fn redis_rs_checks(url: &str) -> redis::RedisResult<()> {
    use redis::AsyncCommands;
    let client = redis::Client::open(url)?;
    let mut con = client.get_multiplexed_async_connection().await?;
    let tag = if url.contains("resp3") { "r3" } else { "r2" };
    let k = |name: &str| format!("{tag}:{name}");
    let _: () = con.set(k("a"), "1").await?;
    let a: String = con.get(k("a")).await?;
    assert_eq!(a, "1");
    let missing: Option<String> = con.get(k("missing")).await?;
    assert_eq!(missing, None);
    let n: i64 = con.incr(k("n"), 5).await?;
    assert_eq!(n, 5);
    let _: () = con.mset(&[(k("x"), "1"), (k("y"), "2")]).await?;
    let got: Vec<Option<String>> = con.mget(&[k("x"), k("y"), k("zz")]).await?;
    assert_eq!(got, [Some("1".into()), Some("2".into()), None]);
    let deleted: i64 = con.del(&[k("x"), k("y"), k("zz")]).await?;
    assert_eq!(deleted, 2);
    let set: bool = con.expire(k("a"), 100).await?;
    assert!(set);
    let ttl: i64 = con.ttl(k("a")).await?;
    // At most 100 s: less if the host stalled since EXPIRE.
    assert!((1..=100).contains(&ttl), "ttl {ttl}");
    let set: bool = con.expire(k("missing"), 5).await?;
    assert!(!set);
    let proto: redis::Value = redis::cmd("HELLO").query_async(&mut con).await?;
    let want = if tag == "r3" { 3 } else { 2 };
    let reported = match &proto {
        redis::Value::Map(pairs) => pairs.iter().find_map(|(k, v)| match (k, v) {
            (redis::Value::BulkString(k), redis::Value::Int(n)) if k == b"proto" => Some(*n),
            _ => None,
        }),
        redis::Value::Array(items) => items.chunks(2).find_map(|kv| match kv {
            [redis::Value::BulkString(k), redis::Value::Int(n)] if k == b"proto" => Some(*n),
            _ => None,
        }),
        _ => None,
    };
    assert_eq!(reported, Some(want), "HELLO: {proto:?}");

    // An atomic pipeline: MULTI ... EXEC, the replies of the commands.
    let (got, n, both): (String, i64, Vec<Option<String>>) = redis::pipe()
        .atomic()
        .set(k("ta"), "1")
        .ignore()
        .get(k("ta"))
        .incr(k("tn"), 2)
        .mget(&[k("ta"), k("zz")])
        .query_async(&mut con)
        .await?;
    assert_eq!((got.as_str(), n), ("1", 2));
    assert_eq!(both, [Some("1".into()), None]);
    // 1,000 commands in one transaction.
    let mut pipe = redis::pipe();
    pipe.atomic();
    for _ in 0..1000 {
        pipe.incr(k("tc"), 1);
    }
    let counts: Vec<i64> = pipe.query_async(&mut con).await?;
    assert_eq!(counts, (1..=1000).collect::<Vec<i64>>());
    // WATCH, then another connection changes the key: EXEC answers nil.
    let mut other = client.get_multiplexed_async_connection().await?;
    redis::cmd("WATCH")
        .arg(k("tw"))
        .query_async::<()>(&mut con)
        .await?;
    let _: () = other.set(k("tw"), "other").await?;
    let aborted = set_and_get_atomically(&mut con, &k("tw"), "mine").await?;
    assert_eq!(aborted, None);
    let tw: String = con.get(k("tw")).await?;
    assert_eq!(tw, "other");
    // Without a change in between it runs.
    redis::cmd("WATCH")
        .arg(k("tw"))
        .query_async::<()>(&mut con)
        .await?;
    let done = set_and_get_atomically(&mut con, &k("tw"), "mine").await?;
    assert_eq!(done, Some(("mine".into(),)));

    // Pipelining: 1,000 commands in one batch.
    let mut pipe = redis::pipe();
    for i in 0..500 {
        pipe.set(k(&format!("p{i}")), i).ignore().incr(k("pc"), 1);
    }
    let counts: Vec<i64> = pipe.query_async(&mut con).await?;
    assert_eq!(counts, (1..=500).collect::<Vec<i64>>());

    // 16 tasks share the multiplexed connection.
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let mut con = con.clone();
            let key = k("shared");
            let own = k(&format!("own{t}"));
            tokio::spawn(async move {
                for i in 0..100 {
                    let _: i64 = con.incr(&key, 1).await?;
                    let _: () = con.set(&own, i).await?;
                }
                redis::RedisResult::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task panicked")?;
    }
    let shared: i64 = con.get(k("shared")).await?;
    assert_eq!(shared, 1600);
    for t in 0..16 {
        let own: i64 = con.get(k(&format!("own{t}"))).await?;
        assert_eq!(own, 99);
    }
    Ok(())
}

#[test]
fn redis_rs_async_multiplexed_in_resp2_and_resp3() {
    if !site::ftkv_ready("redis_rs_async_multiplexed_in_resp2_and_resp3") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = started("ftkv-rs", dir.path(), &["run"]);
    for url in [
        format!("redis://{GUEST_IP}:6379/"),
        format!("redis://{GUEST_IP}:6379/?protocol=resp3"),
    ] {
        let result =
            s.ns.run_in(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(redis_rs_checks(&url))
            })
            .unwrap();
        result.unwrap_or_else(|e| panic!("redis crate with {url}: {e}"));
    }
    stop_clean(s, dir.path());
}

#[test]
fn a_resp3_client_run_replays_with_the_same_disk_root() {
    let Some(python) = python_ready("a_resp3_client_run_replays_with_the_same_disk_root") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut s = FtkvSite::with_new_disk("ftkv-rr3", dir.path()).unwrap();
    let start_copy = dir.path().join("start.img");
    std::fs::copy(dir.path().join("ftkv.img"), &start_copy).unwrap();
    let log = dir.path().join("ftkv.ftlog");
    s.start(&["record", "--log", log.to_str().unwrap()])
        .unwrap();
    redis_py(&s, &python, "workload", &[]);
    let (record, root) = site::record_summary(&s.stop().unwrap()).unwrap();
    let out = site::replay(&s.config, &log, &start_copy).unwrap();
    assert!(
        out.contains(&record.replace("record: ", "replay: OK ")),
        "{out}\nrecorded: {record}"
    );
    assert!(out.contains(&root), "{out}\nrecorded: {root}");
}

/// Lines a child process prints, as they come (read by a thread).
fn lines_of(guard: &mut Guard) -> mpsc::Receiver<String> {
    let stdout = guard
        .child
        .as_mut()
        .and_then(|c| c.stdout.take())
        .expect("stdout piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn transactions_are_all_or_nothing_after_sigkill() {
    let Some(python) = python_ready("transactions_are_all_or_nothing_after_sigkill") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut s = started("ftkv-txk", dir.path(), &["run"]);
    // Four redis-py clients, each a stream of r.pipeline() transactions of
    // 8 SETs of ~200 bytes (a record over several sectors).
    let txn = ["--keys", "8", "--size", "200"];
    let mut writers: Vec<(Guard, mpsc::Receiver<String>)> = (0..4)
        .map(|w| {
            let n = w.to_string();
            let mut args = vec!["--writer", n.as_str()];
            args.extend(txn);
            let mut cmd = redis_py_command(&s, &python, "txn-writer", &args);
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null());
            let mut guard = Guard::spawn(&mut cmd).unwrap();
            let lines = lines_of(&mut guard);
            (guard, lines)
        })
        .collect();
    // Wait (generously: only a hang fails here) until every writer has
    // 50 transactions acknowledged, so the kill lands in a busy stream.
    let mut acked = vec![0usize; writers.len()];
    for (w, (_, lines)) in writers.iter_mut().enumerate() {
        while acked[w] < 50 {
            let line = lines
                .recv_timeout(Duration::from_secs(300))
                .unwrap_or_else(|e| panic!("writer {w} after {} acks: {e}", acked[w]));
            assert!(line.starts_with("acked "), "writer {w}: {line}");
            acked[w] += 1;
        }
    }
    s.kill();
    // The VM is gone without a word on the wire: end the writers, keeping
    // every "acked" line they printed (each an acknowledged EXEC, in order).
    for (guard, _) in &writers {
        guard.signal(libc::SIGTERM);
    }
    for (w, (guard, lines)) in writers.into_iter().enumerate() {
        guard.wait_status().unwrap();
        acked[w] += lines.iter().filter(|l| l.starts_with("acked ")).count();
    }

    s.start(&["run"]).unwrap();
    let acked_list = acked
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut args = vec!["--acked", acked_list.as_str()];
    args.extend(txn);
    let out = redis_py(&s, &python, "txn-check", &args);
    println!("{out}");
    let console = std::fs::read_to_string(dir.path().join("console.log")).unwrap();
    assert!(console.contains("replayed"), "boot log: {console}");
    // Whether the kill tore a record this time (it may or may not).
    for line in console.lines().filter(|l| l.contains("invalid record")) {
        println!("{line}");
    }
    stop_clean(s, dir.path());
}
