use super::{args, execute_resp2, Rng};
use crate::engine::{Config, Engine, Execution};
use crate::resp::Parser;

/// Runs a command and returns the reply as text.
fn run(e: &mut Engine, words: &[&str], now: u64) -> String {
    String::from_utf8(execute_resp2(e, &args(words), now).reply).unwrap()
}

fn check(e: &mut Engine, words: &[&str], now: u64, expected: &str) {
    assert_eq!(run(e, words, now), expected, "{words:?}");
}

#[test]
fn ping_echo() {
    let mut e = Engine::default();
    check(&mut e, &["PING"], 0, "+PONG\r\n");
    check(&mut e, &["ping", "hi"], 0, "$2\r\nhi\r\n");
    check(
        &mut e,
        &["PING", "a", "b"],
        0,
        "-ERR wrong number of arguments for 'ping' command\r\n",
    );
    check(&mut e, &["ECHO", "x y"], 0, "$3\r\nx y\r\n");
    check(
        &mut e,
        &["ECHO"],
        0,
        "-ERR wrong number of arguments for 'echo' command\r\n",
    );
}

#[test]
fn get_set_and_options() {
    let mut e = Engine::default();
    check(&mut e, &["GET", "k"], 0, "$-1\r\n");
    check(&mut e, &["SET", "k", "v"], 0, "+OK\r\n");
    check(&mut e, &["GET", "k"], 0, "$1\r\nv\r\n");
    check(&mut e, &["SET", "k", "w", "NX"], 0, "$-1\r\n");
    check(&mut e, &["GET", "k"], 0, "$1\r\nv\r\n");
    check(&mut e, &["SET", "k", "w", "XX"], 0, "+OK\r\n");
    check(&mut e, &["SET", "n", "w", "xx"], 0, "$-1\r\n");
    check(&mut e, &["SET", "n", "1", "nx"], 0, "+OK\r\n");
    check(
        &mut e,
        &["SET", "k", "v", "NX", "XX"],
        0,
        "-ERR syntax error\r\n",
    );
    check(&mut e, &["SET", "k", "v", "EX"], 0, "-ERR syntax error\r\n");
    check(
        &mut e,
        &["SET", "k", "v", "EX", "1", "PX", "5"],
        0,
        "-ERR syntax error\r\n",
    );
    check(
        &mut e,
        &["SET", "k", "v", "BOGUS"],
        0,
        "-ERR syntax error\r\n",
    );
    check(
        &mut e,
        &["SET", "k", "v", "EX", "x"],
        0,
        "-ERR value is not an integer or out of range\r\n",
    );
    check(
        &mut e,
        &["SET", "k", "v", "EX", "0"],
        0,
        "-ERR invalid expire time in 'set' command\r\n",
    );
    check(
        &mut e,
        &["SET", "k", "v", "PX", "-5"],
        0,
        "-ERR invalid expire time in 'set' command\r\n",
    );
    check(
        &mut e,
        &["SET", "k", "v", "EX", "9223372036854775807"],
        0,
        "-ERR invalid expire time in 'set' command\r\n",
    );
    check(
        &mut e,
        &["SET", "k"],
        0,
        "-ERR wrong number of arguments for 'set' command\r\n",
    );
    check(
        &mut e,
        &["GET"],
        0,
        "-ERR wrong number of arguments for 'get' command\r\n",
    );
    check(
        &mut e,
        &["GET", "a", "b"],
        0,
        "-ERR wrong number of arguments for 'get' command\r\n",
    );
    // Binary-safe keys and values.
    let exec = execute_resp2(&mut e, &[b"SET".to_vec(), vec![0, 13, 10], vec![255, 0]], 0);
    assert_eq!(exec.reply, b"+OK\r\n");
    let exec = execute_resp2(&mut e, &[b"GET".to_vec(), vec![0, 13, 10]], 0);
    assert_eq!(exec.reply, b"$2\r\n\xff\x00\r\n");
}

#[test]
fn expiry_is_lazy_and_uses_only_the_given_time() {
    let mut e = Engine::default();
    check(&mut e, &["SET", "a", "1", "PX", "100"], 1000, "+OK\r\n");
    check(&mut e, &["SET", "b", "1", "EX", "2"], 1000, "+OK\r\n");
    check(&mut e, &["SET", "c", "1", "PXAT", "1500"], 1000, "+OK\r\n");
    check(&mut e, &["SET", "d", "1", "EXAT", "2"], 1000, "+OK\r\n");
    check(&mut e, &["PTTL", "a"], 1000, ":100\r\n");
    check(&mut e, &["TTL", "b"], 1000, ":2\r\n");
    check(&mut e, &["TTL", "nope"], 1000, ":-2\r\n");
    check(&mut e, &["DBSIZE"], 1000, ":4\r\n");
    // Still there at exactly the expiry time (Redis: expired when now > at).
    check(&mut e, &["GET", "a"], 1100, "$1\r\n1\r\n");
    check(&mut e, &["GET", "a"], 1101, "$-1\r\n");
    check(&mut e, &["DBSIZE"], 1600, ":2\r\n");
    check(&mut e, &["EXISTS", "a", "b", "c", "d"], 1600, ":2\r\n");
    check(&mut e, &["DBSIZE"], 3001, ":0\r\n");
    // KEEPTTL keeps, plain SET clears.
    check(&mut e, &["SET", "k", "1", "PX", "50"], 0, "+OK\r\n");
    check(&mut e, &["SET", "k", "2", "KEEPTTL"], 10, "+OK\r\n");
    check(&mut e, &["PTTL", "k"], 10, ":40\r\n");
    check(&mut e, &["INCR", "k"], 20, ":3\r\n");
    check(&mut e, &["PTTL", "k"], 20, ":30\r\n");
    check(&mut e, &["SET", "k", "2"], 20, "+OK\r\n");
    check(&mut e, &["PTTL", "k"], 20, ":-1\r\n");
    // NX succeeds on an expired key.
    check(&mut e, &["SET", "x", "1", "PX", "5"], 0, "+OK\r\n");
    check(&mut e, &["SET", "x", "2", "NX"], 6, "+OK\r\n");
    // b and d expired but were never touched: still stored until purged.
    assert_eq!(e.purge_expired(10_000), 2);
    assert_eq!(e.purge_expired(10_000), 0);
    check(&mut e, &["SET", "y", "1", "PX", "5"], 0, "+OK\r\n");
    assert_eq!(e.purge_expired(10_000), 1);
}

#[test]
fn del_exists() {
    let mut e = Engine::default();
    check(&mut e, &["MSET", "a", "1", "b", "2"], 0, "+OK\r\n");
    check(&mut e, &["EXISTS", "a", "a", "z"], 0, ":2\r\n");
    check(&mut e, &["DEL", "a", "a", "z"], 0, ":1\r\n");
    check(&mut e, &["DEL", "a"], 0, ":0\r\n");
    check(&mut e, &["EXISTS", "a", "b"], 0, ":1\r\n");
    check(
        &mut e,
        &["DEL"],
        0,
        "-ERR wrong number of arguments for 'del' command\r\n",
    );
    check(
        &mut e,
        &["EXISTS"],
        0,
        "-ERR wrong number of arguments for 'exists' command\r\n",
    );
}

#[test]
fn counters() {
    let mut e = Engine::default();
    check(&mut e, &["INCR", "n"], 0, ":1\r\n");
    check(&mut e, &["INCRBY", "n", "41"], 0, ":42\r\n");
    check(&mut e, &["DECR", "n"], 0, ":41\r\n");
    check(&mut e, &["DECRBY", "n", "50"], 0, ":-9\r\n");
    check(&mut e, &["GET", "n"], 0, "$2\r\n-9\r\n");
    check(
        &mut e,
        &["INCRBY", "n", "x"],
        0,
        "-ERR value is not an integer or out of range\r\n",
    );
    check(&mut e, &["SET", "s", "abc"], 0, "+OK\r\n");
    check(
        &mut e,
        &["INCR", "s"],
        0,
        "-ERR value is not an integer or out of range\r\n",
    );
    check(&mut e, &["SET", "s", " 1"], 0, "+OK\r\n");
    check(
        &mut e,
        &["INCR", "s"],
        0,
        "-ERR value is not an integer or out of range\r\n",
    );
    check(&mut e, &["SET", "m", "9223372036854775807"], 0, "+OK\r\n");
    check(
        &mut e,
        &["INCR", "m"],
        0,
        "-ERR increment or decrement would overflow\r\n",
    );
    check(
        &mut e,
        &["DECRBY", "z", "-9223372036854775808"],
        0,
        "-ERR decrement would overflow\r\n",
    );
    check(
        &mut e,
        &["INCR"],
        0,
        "-ERR wrong number of arguments for 'incr' command\r\n",
    );
    check(
        &mut e,
        &["INCRBY", "n"],
        0,
        "-ERR wrong number of arguments for 'incrby' command\r\n",
    );
}

#[test]
fn mget_mset_dbsize_flushall() {
    let mut e = Engine::default();
    check(
        &mut e,
        &["MSET", "a", "1", "b", "2", "a", "3"],
        0,
        "+OK\r\n",
    );
    check(
        &mut e,
        &["MGET", "a", "b", "c"],
        0,
        "*3\r\n$1\r\n3\r\n$1\r\n2\r\n$-1\r\n",
    );
    check(
        &mut e,
        &["MSET", "a", "1", "b"],
        0,
        "-ERR wrong number of arguments for 'mset' command\r\n",
    );
    check(
        &mut e,
        &["MSET", "a"],
        0,
        "-ERR wrong number of arguments for 'mset' command\r\n",
    );
    check(
        &mut e,
        &["MGET"],
        0,
        "-ERR wrong number of arguments for 'mget' command\r\n",
    );
    check(&mut e, &["DBSIZE"], 0, ":2\r\n");
    check(
        &mut e,
        &["DBSIZE", "x"],
        0,
        "-ERR wrong number of arguments for 'dbsize' command\r\n",
    );
    check(&mut e, &["FLUSHALL", "bogus"], 0, "-ERR syntax error\r\n");
    check(&mut e, &["FLUSHALL", "ASYNC"], 0, "+OK\r\n");
    check(&mut e, &["DBSIZE"], 0, ":0\r\n");
    assert_eq!(e.used_memory(), 0);
}

#[test]
fn client_compat_stubs() {
    let mut e = Engine::default();
    check(
        &mut e,
        &["CONFIG", "GET", "save"],
        0,
        "*2\r\n$4\r\nsave\r\n$0\r\n\r\n",
    );
    check(
        &mut e,
        &["config", "get", "appendonly"],
        0,
        "*2\r\n$10\r\nappendonly\r\n$3\r\nyes\r\n",
    );
    check(&mut e, &["CONFIG", "GET", "nothing"], 0, "*0\r\n");
    check(
        &mut e,
        &["CONFIG", "GET", "append*"],
        0,
        "*4\r\n$10\r\nappendonly\r\n$3\r\nyes\r\n$11\r\nappendfsync\r\n$6\r\nalways\r\n",
    );
    check(
        &mut e,
        &["CONFIG", "GET"],
        0,
        "-ERR wrong number of arguments for 'config|get' command\r\n",
    );
    check(
        &mut e,
        &["CONFIG", "SET", "save", ""],
        0,
        "-ERR CONFIG SET is not supported by ftkv\r\n",
    );
    check(
        &mut e,
        &["CONFIG", "FOO"],
        0,
        "-ERR unknown subcommand 'FOO'. Try CONFIG HELP.\r\n",
    );
    check(&mut e, &["SELECT", "0"], 0, "+OK\r\n");
    check(
        &mut e,
        &["SELECT", "1"],
        0,
        "-ERR DB index is out of range\r\n",
    );
    check(
        &mut e,
        &["SELECT", "x"],
        0,
        "-ERR value is not an integer or out of range\r\n",
    );
    check(&mut e, &["CLIENT", "SETNAME", "bench"], 0, "+OK\r\n");
    check(
        &mut e,
        &["CLIENT", "SETNAME", "a b"],
        0,
        "-ERR Client names cannot contain spaces, newlines or special characters.\r\n",
    );
    check(
        &mut e,
        &["CLIENT", "SETINFO", "lib-name", "redis-py"],
        0,
        "+OK\r\n",
    );
    check(&mut e, &["CLIENT", "GETNAME"], 0, "$-1\r\n");
    check(
        &mut e,
        &["CLIENT", "KILL"],
        0,
        "-ERR unknown subcommand 'KILL'. Try CLIENT HELP.\r\n",
    );
    check(&mut e, &["COMMAND"], 0, "*0\r\n");
    check(&mut e, &["COMMAND", "DOCS"], 0, "*0\r\n");
    check(&mut e, &["COMMAND", "COUNT"], 0, ":35\r\n");
    check(
        &mut e,
        &["COMMAND", "INFO", "get", "x"],
        0,
        "*2\r\n$-1\r\n$-1\r\n",
    );
    let q = execute_resp2(&mut e, &args(&["QUIT"]), 0);
    assert_eq!(
        q,
        Execution {
            reply: b"+OK\r\n".to_vec(),
            log: None,
            close: true
        }
    );
}

#[test]
fn unknown_command_format() {
    let mut e = Engine::default();
    check(
        &mut e,
        &["foo"],
        0,
        "-ERR unknown command 'foo', with args beginning with: \r\n",
    );
    check(
        &mut e,
        &["foo", "a\r\nb", "c"],
        0,
        "-ERR unknown command 'foo', with args beginning with: 'a  b' 'c' \r\n",
    );
    let long = "x".repeat(300);
    let reply = run(&mut e, &[&long, &long, "y"], 0);
    assert_eq!(
        reply,
        format!(
            "-ERR unknown command '{}', with args beginning with: '{}' \r\n",
            "x".repeat(128),
            "x".repeat(128)
        )
    );
    assert_eq!(
        execute_resp2(&mut e, &[], 0).reply,
        b"-ERR empty command\r\n"
    );
}

#[test]
fn info_has_server_and_keyspace() {
    let mut e = Engine::default();
    e.set_connected_clients(3);
    check(&mut e, &["SET", "a", "1", "EX", "100"], 5000, "+OK\r\n");
    check(&mut e, &["SET", "b", "1"], 5000, "+OK\r\n");
    let r = run(&mut e, &["INFO"], 7000);
    let body_start = r.find("\r\n").unwrap() + 2;
    let len: usize = r[1..body_start - 2].parse().unwrap();
    let body = &r[body_start..r.len() - 2];
    assert_eq!(body.len(), len);
    assert!(
        body.starts_with("# Server\r\nredis_version:7.0.0-ftkv\r\n"),
        "{body}"
    );
    assert!(body.contains("uptime_in_seconds:7\r\n"), "{body}");
    assert!(body.contains("connected_clients:3\r\n"), "{body}");
    assert!(body.contains("aof_enabled:1\r\n"), "{body}");
    assert!(
        body.contains("# Keyspace\r\ndb0:keys=2,expires=1,avg_ttl=0\r\n"),
        "{body}"
    );
    let r = run(&mut e, &["INFO", "keyspace"], 7000);
    assert_eq!(
        r,
        "$44\r\n# Keyspace\r\ndb0:keys=2,expires=1,avg_ttl=0\r\n\r\n"
    );
    let r = run(&mut e, &["INFO", "server"], 7000);
    assert!(!r.contains("Keyspace"));
}

#[test]
fn writes_log_reads_do_not() {
    let mut e = Engine::default();
    let logged = |e: &mut Engine, w: &[&str]| execute_resp2(e, &args(w), 0).log.is_some();
    assert!(logged(&mut e, &["SET", "a", "1"]));
    assert!(!logged(&mut e, &["SET", "a", "1", "NX"]));
    assert!(!logged(&mut e, &["GET", "a"]));
    assert!(logged(&mut e, &["INCR", "a"]));
    assert!(!logged(&mut e, &["INCR", "x", "y"]));
    assert!(logged(&mut e, &["DEL", "a"]));
    assert!(!logged(&mut e, &["DEL", "a"]));
    assert!(logged(&mut e, &["MSET", "a", "1"]));
    assert!(logged(&mut e, &["FLUSHALL"]));
    assert!(!logged(&mut e, &["PING"]));
}

#[test]
fn out_of_memory_and_disk_full_refuse_without_changing_state() {
    let mut e = Engine::new(Config {
        max_memory: 1000,
        ..Config::default()
    });
    check(&mut e, &["SET", "a", &"x".repeat(500)], 0, "+OK\r\n");
    check(
        &mut e,
        &["SET", "b", &"x".repeat(500)],
        0,
        "-OOM command not allowed when used memory > 'maxmemory'.\r\n",
    );
    check(&mut e, &["EXISTS", "b"], 0, ":0\r\n");
    // Shrinking and deleting still work at the limit.
    check(&mut e, &["SET", "a", "small"], 0, "+OK\r\n");
    check(&mut e, &["DEL", "a"], 0, ":1\r\n");
    assert_eq!(e.used_memory(), 0);

    let mut e = Engine::default();
    // Room for exactly one SET k v record (16 header + 1 op + 1 flags + 4+1 + 4+1).
    e.set_log_budget(Some(28));
    check(&mut e, &["SET", "k", "v"], 0, "+OK\r\n");
    assert_eq!(e.log_budget(), Some(0));
    let exec = execute_resp2(&mut e, &args(&["SET", "k", "w"]), 0);
    assert_eq!(exec.reply, b"-ERR disk full\r\n");
    assert_eq!(exec.log, None);
    check(&mut e, &["GET", "k"], 0, "$1\r\nv\r\n");
    check(&mut e, &["INCR", "n"], 0, "-ERR disk full\r\n");
    check(&mut e, &["EXISTS", "n"], 0, ":0\r\n");

    e.set_log_budget(None);
    e.set_write_error(true);
    check(
        &mut e,
        &["SET", "k", "w"],
        0,
        "-ERR disk error: writes are refused\r\n",
    );
    check(&mut e, &["GET", "k"], 0, "$1\r\nv\r\n");
}

#[test]
fn parser_and_engine_survive_random_commands() {
    // Random commands built from known names and junk arguments: the engine
    // must never panic, and every reply must be one well-formed RESP value.
    let names = [
        "GET", "SET", "DEL", "EXISTS", "INCR", "DECR", "INCRBY", "DECRBY", "MGET", "MSET",
        "DBSIZE", "FLUSHALL", "INFO", "COMMAND", "CONFIG", "SELECT", "CLIENT", "PING", "ECHO",
        "TTL", "PTTL", "QUIT", "HELLO", "NX", "XX", "EX", "PX", "KEEPTTL",
    ];
    let words = [
        "k",
        "v",
        "1",
        "-1",
        "0",
        "NX",
        "XX",
        "EX",
        "PX",
        "EXAT",
        "PXAT",
        "KEEPTTL",
        "9223372036854775807",
        "-9223372036854775808",
        "GET",
        "save",
        "*",
        "",
        "x y",
    ];
    let mut rng = Rng(42);
    let mut e = Engine::new(Config {
        max_memory: 100_000,
        ..Config::default()
    });
    e.set_log_budget(Some(50_000));
    for i in 0..100_000u64 {
        let mut cmd = vec![names[rng.below(names.len() as u64) as usize]
            .as_bytes()
            .to_vec()];
        for _ in 0..rng.below(6) {
            if rng.below(8) == 0 {
                cmd.push((0..rng.below(10)).map(|_| rng.next() as u8).collect());
            } else {
                cmd.push(
                    words[rng.below(words.len() as u64) as usize]
                        .as_bytes()
                        .to_vec(),
                );
            }
        }
        let exec = execute_resp2(&mut e, &cmd, i);
        let mut p = Parser::default();
        // A reply parses as an inline "command" only if it is one line;
        // check the framing by hand instead.
        assert!(exec.reply.ends_with(b"\r\n"), "{cmd:?} -> {:?}", exec.reply);
        assert!(matches!(exec.reply[0], b'+' | b'-' | b':' | b'$' | b'*'));
        let _ = p.feed(&exec.reply);
    }
}
