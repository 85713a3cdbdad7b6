//! MULTI / EXEC / DISCARD / WATCH / UNWATCH. Expected bytes are what
//! redis-server 7.0.15 sends for the same commands (checked side by side,
//! RESP2 and RESP3), with ftkv's version in HELLO.

use super::{args, Rng};
use crate::engine::{Config, Engine, Session};

/// Several connections to one engine, at a time that only moves forward.
struct Clients {
    engine: Engine,
    sessions: Vec<Session>,
    now: u64,
}

impl Clients {
    fn new(n: usize) -> Self {
        Self::with_config(n, Config::default())
    }

    fn with_config(n: usize, config: Config) -> Self {
        Clients {
            engine: Engine::new(config),
            sessions: (1..=n as u64).map(Session::new).collect(),
            now: 1_000,
        }
    }

    fn run(&mut self, c: usize, words: &[&str]) -> String {
        let exec = self
            .engine
            .execute(&mut self.sessions[c], &args(words), self.now);
        String::from_utf8(exec.reply).unwrap()
    }

    /// Runs each command on connection `c` and checks its reply.
    fn script(&mut self, c: usize, steps: &[(&[&str], &str)]) {
        for (words, expected) in steps {
            assert_eq!(self.run(c, words), *expected, "client {c}: {words:?}");
        }
    }
}

const OK: &str = "+OK\r\n";
const QUEUED: &str = "+QUEUED\r\n";
const EXECABORT: &str = "-EXECABORT Transaction discarded because of previous errors.\r\n";

/// The steps of `t1` (see the module doc) in `proto`: `null` is its null,
/// `null_array` what an aborted EXEC answers.
fn basic_script(c: &mut Clients, null: &str, null_array: &str) {
    c.script(
        0,
        &[
            (&["EXEC"], "-ERR EXEC without MULTI\r\n"),
            (&["DISCARD"], "-ERR DISCARD without MULTI\r\n"),
            (&["MULTI"], OK),
            (&["MULTI"], "-ERR MULTI calls can not be nested\r\n"),
            (&["SET", "a", "1"], QUEUED),
            (&["GET", "a"], QUEUED),
            (&["GET", "nope"], QUEUED),
            (&["EXEC"], &format!("*3\r\n+OK\r\n$1\r\n1\r\n{null}")),
            (&["MULTI"], OK),
            (&["EXEC"], "*0\r\n"),
            // An arity error while queueing fails the transaction.
            (&["MULTI"], OK),
            (
                &["SET", "a"],
                "-ERR wrong number of arguments for 'set' command\r\n",
            ),
            (&["SET", "b", "2"], QUEUED),
            (&["EXEC"], EXECABORT),
            (&["GET", "b"], null),
            (&["MULTI"], OK),
            (
                &["FOO", "x"],
                "-ERR unknown command 'FOO', with args beginning with: 'x' \r\n",
            ),
            (&["EXEC"], EXECABORT),
            // Other errors show in EXEC's reply; the rest runs.
            (&["MULTI"], OK),
            (&["SET", "a", "1", "BAD"], QUEUED),
            (&["INCR", "a"], QUEUED),
            (&["SET", "s", "x"], QUEUED),
            (&["INCR", "s"], QUEUED),
            (
                &["EXEC"],
                "*4\r\n-ERR syntax error\r\n:2\r\n+OK\r\n-ERR value is not an integer or out of range\r\n",
            ),
            (&["MULTI"], OK),
            (&["WATCH", "a"], "-ERR WATCH inside MULTI is not allowed\r\n"),
            (&["UNWATCH"], QUEUED),
            (&["PING"], QUEUED),
            (&["DISCARD"], OK),
            (&["DISCARD"], "-ERR DISCARD without MULTI\r\n"),
            // The connection's own write also aborts its EXEC.
            (&["WATCH", "a"], OK),
            (&["SET", "a", "9"], OK),
            (&["MULTI"], OK),
            (&["GET", "a"], QUEUED),
            (&["EXEC"], null_array),
            (&["WATCH", "a"], OK),
            (&["MULTI"], OK),
            (&["GET", "a"], QUEUED),
            (&["EXEC"], "*1\r\n$1\r\n9\r\n"),
            (
                &["WATCH"],
                "-ERR wrong number of arguments for 'watch' command\r\n",
            ),
            (
                &["UNWATCH", "x"],
                "-ERR wrong number of arguments for 'unwatch' command\r\n",
            ),
            (
                &["MULTI", "x"],
                "-ERR wrong number of arguments for 'multi' command\r\n",
            ),
            (
                &["EXEC", "x"],
                "-EXECABORT Transaction discarded because of: wrong number of arguments for 'exec' command\r\n",
            ),
            (
                &["DISCARD", "x"],
                "-ERR wrong number of arguments for 'discard' command\r\n",
            ),
            (&["MULTI"], OK),
            (&["MGET", "a", "b", "zz"], QUEUED),
            (
                &["EXEC"],
                &format!("*1\r\n*3\r\n$1\r\n9\r\n{null}{null}"),
            ),
        ],
    );
}

#[test]
fn multi_exec_discard_answer_as_redis_in_resp2() {
    let mut c = Clients::new(1);
    basic_script(&mut c, "$-1\r\n", "*-1\r\n");
}

#[test]
fn multi_exec_discard_answer_as_redis_in_resp3() {
    let mut c = Clients::new(1);
    assert!(c.run(0, &["HELLO", "3"]).starts_with("%7\r\n"));
    basic_script(&mut c, "_\r\n", "_\r\n");
}

#[test]
fn quit_in_multi_closes_at_once() {
    let mut c = Clients::new(1);
    c.script(0, &[(&["MULTI"], OK), (&["SET", "a", "1"], QUEUED)]);
    let exec = c
        .engine
        .execute(&mut c.sessions[0], &args(&["QUIT"]), c.now);
    assert_eq!(exec.reply, OK.as_bytes());
    assert!(exec.close);
    c.engine.end_session(&mut c.sessions[0]);
    assert_eq!(c.engine.peek(b"a", c.now), None);
}

#[test]
fn errors_while_queueing_fail_the_transaction_as_in_redis() {
    let mut c = Clients::new(1);
    let arity_and_subcommands: &[(&[&str], &str)] = &[
        (
            &["MULTI", "x"],
            "-ERR wrong number of arguments for 'multi' command\r\n",
        ),
        (
            &["WATCH"],
            "-ERR wrong number of arguments for 'watch' command\r\n",
        ),
        (
            &["DISCARD", "x"],
            "-ERR wrong number of arguments for 'discard' command\r\n",
        ),
        (
            &["UNWATCH", "x"],
            "-ERR wrong number of arguments for 'unwatch' command\r\n",
        ),
        (
            &["CLIENT", "BOGUS"],
            "-ERR unknown subcommand 'BOGUS'. Try CLIENT HELP.\r\n",
        ),
        (
            &["CONFIG", "BOGUS"],
            "-ERR unknown subcommand 'BOGUS'. Try CONFIG HELP.\r\n",
        ),
        (
            &["CLIENT"],
            "-ERR wrong number of arguments for 'client' command\r\n",
        ),
        (
            &["CONFIG", "GET"],
            "-ERR wrong number of arguments for 'config|get' command\r\n",
        ),
        (
            &["", ""],
            "-ERR unknown command '', with args beginning with: '' \r\n",
        ),
    ];
    for &(words, error) in arity_and_subcommands {
        c.script(
            0,
            &[
                (&["MULTI"], OK),
                (&["SET", "q", "1"], QUEUED),
                (words, error),
                (&["EXEC"], EXECABORT),
                (&["GET", "q"], "$-1\r\n"),
            ],
        );
    }
    // A malformed EXEC discards the transaction and says why.
    c.script(
        0,
        &[
            (&["MULTI"], OK),
            (&["SET", "q", "2"], QUEUED),
            (
                &["EXEC", "x"],
                "-EXECABORT Transaction discarded because of: wrong number of arguments for 'exec' command\r\n",
            ),
            (&["EXEC"], "-ERR EXEC without MULTI\r\n"),
            (&["GET", "q"], "$-1\r\n"),
        ],
    );
    // MULTI and WATCH inside MULTI are refused without failing it.
    c.script(
        0,
        &[
            (&["MULTI"], OK),
            (&["MULTI"], "-ERR MULTI calls can not be nested\r\n"),
            (
                &["WATCH", "k"],
                "-ERR WATCH inside MULTI is not allowed\r\n",
            ),
            (&["SET", "k", "5"], QUEUED),
            (&["EXEC"], "*1\r\n+OK\r\n"),
        ],
    );
    // Errors Redis finds only when the command runs show in EXEC's reply.
    c.script(
        0,
        &[
            (&["MULTI"], OK),
            (&["FLUSHALL"], QUEUED),
            (&["FLUSHALL", "BAD"], QUEUED),
            (&["CLIENT", "SETNAME", "a b"], QUEUED),
            (&["PING", "a", "b"], QUEUED),
            (
                &["EXEC"],
                "*4\r\n+OK\r\n-ERR syntax error\r\n\
                 -ERR Client names cannot contain spaces, newlines or special characters.\r\n\
                 -ERR wrong number of arguments for 'ping' command\r\n",
            ),
        ],
    );
}

#[test]
fn connection_commands_run_inside_exec_in_the_protocol_of_their_time() {
    let mut c = Clients::new(1);
    c.script(
        0,
        &[
            (&["MULTI"], OK),
            (&["AUTH", "default", "x"], QUEUED),
            (&["SELECT", "0"], QUEUED),
            (&["CLIENT", "SETNAME", "n1"], QUEUED),
            (&["CLIENT", "GETNAME"], QUEUED),
            (&["HELLO", "3"], QUEUED),
            (&["GET", "nope"], QUEUED),
        ],
    );
    let reply = c.run(0, &["EXEC"]);
    // The array header is RESP2 (the protocol at EXEC); HELLO's map and
    // every reply after it are RESP3.
    assert!(
        reply.starts_with("*6\r\n+OK\r\n+OK\r\n+OK\r\n$2\r\nn1\r\n%7\r\n$6\r\nserver\r\n"),
        "{reply}"
    );
    assert!(reply.ends_with("$7\r\nmodules\r\n*0\r\n_\r\n"), "{reply}");
}

/// Connection 0 WATCHes `key`; `interfere` runs; then MULTI, PING, EXEC.
/// True if EXEC ran (false: aborted with a null array).
fn exec_after(c: &mut Clients, key: &str, interfere: &dyn Fn(&mut Clients)) -> bool {
    assert_eq!(c.run(0, &["WATCH", key]), OK);
    interfere(c);
    assert_eq!(c.run(0, &["MULTI"]), OK);
    assert_eq!(c.run(0, &["PING"]), QUEUED);
    match c.run(0, &["EXEC"]).as_str() {
        "*1\r\n+PONG\r\n" => true,
        "*-1\r\n" => false,
        other => panic!("EXEC answered {other:?}"),
    }
}

#[test]
fn watch_aborts_exec_exactly_when_redis_does() {
    let mut c = Clients::new(2);
    let other = |words: &'static [&'static str]| {
        move |c: &mut Clients| {
            c.run(1, words);
        }
    };
    c.run(0, &["SET", "k", "1"]);
    // Any write of the key by another connection, even to the same value.
    assert!(!exec_after(&mut c, "k", &other(&["SET", "k", "1"])));
    assert_eq!(c.run(0, &["GET", "k"]), "$1\r\n1\r\n");
    // Writes that change nothing do not count.
    for words in [
        &["SET", "k", "x", "NX"][..],
        &["DEL", "missing"],
        &["EXPIRE", "missing", "10"],
        &["PERSIST", "k"],
        &["SET", "missing", "v", "XX"],
        &["EXPIRE", "k", "100", "GT"],
        &["GET", "k"],
    ] {
        assert!(exec_after(&mut c, "k", &|c| {
            c.run(1, words);
        }));
    }
    for words in [
        &["DEL", "k"][..],
        &["SET", "k", "2"],
        &["EXPIRE", "k", "100"],
        &["PERSIST", "k"],
        &["INCRBY", "k", "0"],
        &["MSET", "z", "1", "k", "3"],
        &["EXPIRE", "k", "-1"],
    ] {
        if c.run(1, &["EXISTS", "k"]) == ":0\r\n" {
            c.run(1, &["SET", "k", "1"]);
        }
        assert!(!exec_after(&mut c, "k", &|c| {
            c.run(1, words);
        }));
    }
    // A missing key that was set and deleted again changed.
    assert!(!exec_after(&mut c, "m", &|c| {
        c.run(1, &["SET", "m", "1"]);
        c.run(1, &["DEL", "m"]);
    }));
    // FLUSHALL changes the watched keys that exist, not the others.
    c.run(0, &["SET", "f", "1"]);
    assert!(!exec_after(&mut c, "f", &other(&["FLUSHALL"])));
    c.run(0, &["SET", "g", "1"]);
    assert!(exec_after(&mut c, "nothere", &other(&["FLUSHALL"])));
    assert!(exec_after(&mut c, "nothere", &other(&["FLUSHALL"])));
    // The transaction's own writes do not abort it.
    c.script(
        0,
        &[
            (&["SET", "k", "1"], OK),
            (&["WATCH", "k"], OK),
            (&["MULTI"], OK),
            (&["SET", "k", "2"], QUEUED),
            (&["EXEC"], "*1\r\n+OK\r\n"),
        ],
    );
}

#[test]
fn watches_end_with_exec_discard_unwatch_and_execabort() {
    let mut c = Clients::new(2);
    c.run(0, &["SET", "k", "1"]);
    let ends: &[&[&[&str]]] = &[
        &[&["MULTI"], &["EXEC"]],
        &[&["MULTI"], &["DISCARD"]],
        &[&["UNWATCH"]],
        &[&["MULTI"], &["NOPE"], &["EXEC"]],
        &[&["EXEC", "x"]],
    ];
    for end in ends {
        c.run(0, &["WATCH", "k"]);
        for words in *end {
            c.run(0, words);
        }
        assert_eq!(c.sessions[0].watched(), 0, "{end:?}");
        assert_eq!(c.engine.watched_keys(), 0, "{end:?}");
        c.run(1, &["SET", "k", "3"]);
        c.script(
            0,
            &[
                (&["MULTI"], OK),
                (&["PING"], QUEUED),
                (&["EXEC"], "*1\r\n+PONG\r\n"),
            ],
        );
    }
    // EXECABORT wins over a changed watched key.
    c.script(0, &[(&["WATCH", "k"], OK)]);
    c.run(1, &["SET", "k", "4"]);
    c.script(
        0,
        &[
            (&["MULTI"], OK),
            (
                &["NOPE"],
                "-ERR unknown command 'NOPE', with args beginning with: \r\n",
            ),
            (&["EXEC"], EXECABORT),
        ],
    );
}

#[test]
fn expiry_of_a_watched_key_aborts_exec_as_in_redis() {
    let mut c = Clients::new(2);
    // Alive at WATCH, expired at EXEC: aborted, whether or not anything
    // removed it in between (a read, FLUSHALL, the purge).
    let removals: [&dyn Fn(&mut Clients); 4] = [
        &|_| {},
        &|c| {
            c.run(1, &["GET", "e"]);
        },
        &|c| {
            c.run(1, &["FLUSHALL"]);
        },
        &|c| {
            c.engine.purge_expired(c.now);
        },
    ];
    for remove in removals {
        c.run(0, &["SET", "e", "1", "PX", "100"]);
        assert!(!exec_after(&mut c, "e", &|c| {
            c.now += 200;
            remove(c);
        }));
    }
    // Already expired at WATCH: its removal is no change, a new value is.
    for remove in removals {
        c.run(0, &["SET", "x", "1", "PX", "100"]);
        c.now += 200;
        assert!(exec_after(&mut c, "x", remove));
    }
    c.run(0, &["SET", "x", "1", "PX", "100"]);
    c.now += 200;
    assert!(!exec_after(&mut c, "x", &|c| {
        c.run(1, &["SET", "x", "2"]);
    }));
    // A key with a TTL that has not passed is no change.
    c.run(0, &["SET", "y", "1", "PX", "100000"]);
    assert!(exec_after(&mut c, "y", &|c| {
        c.run(1, &["GET", "y"]);
        c.now += 10;
    }));
}

#[test]
fn closing_a_connection_forgets_its_watches_and_queue() {
    let mut c = Clients::new(3);
    c.run(0, &["WATCH", "a", "b", "a"]);
    c.run(1, &["WATCH", "b", "c"]);
    assert_eq!(c.sessions[0].watched(), 2);
    assert_eq!(c.engine.watched_keys(), 3);
    c.run(0, &["MULTI"]);
    c.run(0, &["SET", "a", "1"]);
    assert_eq!(c.sessions[0].queued(), 1);
    c.engine.end_session(&mut c.sessions[0]);
    assert!(!c.sessions[0].in_transaction());
    assert_eq!(c.engine.watched_keys(), 2);
    // Connection 1 still watches b: a change still aborts its EXEC.
    c.run(2, &["SET", "a", "2"]);
    c.run(2, &["SET", "b", "2"]);
    c.script(
        1,
        &[
            (&["MULTI"], OK),
            (&["GET", "b"], QUEUED),
            (&["EXEC"], "*-1\r\n"),
        ],
    );
    assert_eq!(c.engine.watched_keys(), 0);
    // The queued SET never ran.
    assert_eq!(c.engine.peek(b"a", c.now), Some(&b"2"[..]));
}

#[test]
fn a_rebuilt_engine_takes_the_watches_over_and_aborts_them() {
    let mut c = Clients::new(2);
    c.run(0, &["SET", "k", "1"]);
    c.run(0, &["WATCH", "k"]);
    c.run(1, &["WATCH", "k", "other"]);
    let mut rebuilt = Engine::default();
    rebuilt.take_watches(&mut c.engine);
    c.engine = rebuilt;
    assert_eq!(c.engine.watched_keys(), 2);
    c.script(
        0,
        &[
            (&["MULTI"], OK),
            (&["PING"], QUEUED),
            (&["EXEC"], "*-1\r\n"),
        ],
    );
    c.engine.end_session(&mut c.sessions[1]);
    assert_eq!(c.engine.watched_keys(), 0);
}

fn small_limits() -> Config {
    Config {
        max_queued_commands: 3,
        max_queued_bytes: 400,
        max_watched_bytes: 200,
        ..Config::default()
    }
}

#[test]
fn the_queue_is_bounded_in_commands_and_bytes() {
    let too_large = "-ERR transaction too large: at most 3 queued commands and 400 bytes\r\n";
    let mut c = Clients::with_config(1, small_limits());
    c.script(
        0,
        &[
            (&["MULTI"], OK),
            (&["SET", "a", "1"], QUEUED),
            (&["SET", "b", "1"], QUEUED),
            (&["SET", "c", "1"], QUEUED),
            (&["SET", "d", "1"], too_large),
            (&["EXEC"], EXECABORT),
            (&["GET", "a"], "$-1\r\n"),
        ],
    );
    // SET k <300 bytes>: 3 arguments, 3 x 32 + 304 = 400 bytes: fits alone.
    let big = "v".repeat(300);
    c.script(
        0,
        &[
            (&["MULTI"], OK),
            (&["SET", "k", &big], QUEUED),
            (&["PING"], too_large),
            (&["EXEC"], EXECABORT),
        ],
    );
    // Watched keys: 100 + 32 bytes, then one more of 1 + 32, then no more.
    let key = "w".repeat(100);
    let watch_error = "-ERR too many watched keys: at most 200 bytes of them\r\n";
    c.script(
        0,
        &[
            (&["WATCH", &key], OK),
            (&["WATCH", &key, "x"], OK),
            (&["WATCH", "y", &"z".repeat(40)], watch_error),
            (&["WATCH", &key, "x", "y"], OK),
        ],
    );
    assert_eq!(c.sessions[0].watched(), 3);
    c.script(0, &[(&["WATCH", "z"], watch_error)]);
}

#[test]
fn exec_replies_are_bounded_but_never_hide_a_write() {
    let mut c = Clients::with_config(
        1,
        Config {
            max_reply: 1000,
            ..Config::default()
        },
    );
    let value = "v".repeat(600);
    let too_large = "-ERR reply too large (limit 1000 bytes)\r\n";
    c.run(0, &["SET", "big", &value]);
    c.run(0, &["MULTI"]);
    c.run(0, &["GET", "big"]);
    c.run(0, &["GET", "big"]);
    c.run(0, &["SET", "after", "1"]);
    c.run(0, &["MGET", "big", "big"]);
    c.run(0, &["GET", "after"]);
    let reply = c.run(0, &["EXEC"]);
    let bulk = format!("$600\r\n{value}\r\n");
    assert_eq!(
        reply,
        format!("*5\r\n{bulk}{too_large}+OK\r\n{too_large}$1\r\n1\r\n")
    );
    // MGET alone is bounded the same way.
    assert_eq!(c.run(0, &["MGET", "big", "big"]), too_large);
    assert_eq!(c.run(0, &["MGET", "big"]), format!("*1\r\n{bulk}"));
}

#[test]
fn exec_logs_one_record_and_writes_inside_it_are_checked_one_by_one() {
    let mut e = Engine::new(Config {
        max_memory: 300,
        ..Config::default()
    });
    let mut s = Session::new(1);
    let mut run = |e: &mut Engine, words: &[&str]| e.execute(&mut s, &args(words), 5);
    e.set_log_budget(Some(10_000));
    assert_eq!(run(&mut e, &["MULTI"]).log, None);
    for words in [
        &["SET", "a", "1"][..],
        &["SET", "huge", &"h".repeat(300)],
        &["INCR", "n"],
        &["GET", "a"],
    ] {
        let queued = run(&mut e, words);
        assert_eq!(queued.reply, QUEUED.as_bytes());
        assert_eq!(queued.log, None);
    }
    let exec = run(&mut e, &["EXEC"]);
    assert_eq!(
        String::from_utf8(exec.reply).unwrap(),
        "*4\r\n+OK\r\n-OOM command not allowed when used memory > 'maxmemory'.\r\n:1\r\n$1\r\n1\r\n"
    );
    // One record holds both changes; the budget went down by its size.
    let record = exec.log.unwrap();
    assert_eq!(
        e.log_budget(),
        Some(10_000 - crate::aof::record_len(record.len()))
    );
    let mut replica = Engine::default();
    replica.apply_record(&record, crate::aof::VERSION).unwrap();
    assert_eq!(replica.peek(b"a", 5), Some(&b"1"[..]));
    assert_eq!(replica.peek(b"n", 5), Some(&b"1"[..]));
    assert_eq!(replica.peek(b"huge", 5), None);
    // Reads only, or nothing: no record.
    run(&mut e, &["MULTI"]);
    run(&mut e, &["GET", "a"]);
    assert_eq!(run(&mut e, &["EXEC"]).log, None);
    run(&mut e, &["MULTI"]);
    assert_eq!(run(&mut e, &["EXEC"]).log, None);
    // The disk fills up in the middle: the writes after that are refused.
    let budget = e.log_budget().unwrap();
    // The first SET takes 16 + 5 + 4 + 12 = 37 bytes, the second 16 more.
    e.set_log_budget(Some(50));
    run(&mut e, &["MULTI"]);
    run(&mut e, &["SET", "b", "2"]);
    run(&mut e, &["SET", "c", "3"]);
    let exec = run(&mut e, &["EXEC"]);
    assert_eq!(
        String::from_utf8(exec.reply).unwrap(),
        "*2\r\n+OK\r\n-ERR disk full\r\n"
    );
    assert_eq!(crate::aof::record_len(exec.log.unwrap().len()), 37);
    assert_eq!(e.log_budget(), Some(13));
    e.set_log_budget(Some(budget));
}

#[test]
fn random_transactions_from_many_connections_never_panic_or_leak_watches() {
    let names = [
        "MULTI", "EXEC", "DISCARD", "WATCH", "UNWATCH", "GET", "SET", "DEL", "INCR", "MGET",
        "MSET", "EXPIRE", "PERSIST", "FLUSHALL", "PING", "HELLO", "QUIT", "NOPE",
    ];
    let words = ["k", "j", "1", "2", "3", "PX", "NX", "", "x"];
    let mut rng = Rng(0x7a);
    let mut c = Clients::with_config(4, small_limits());
    c.engine.set_log_budget(Some(1 << 20));
    for _ in 0..50_000 {
        let who = rng.below(4) as usize;
        let mut cmd = vec![names[rng.below(names.len() as u64) as usize]
            .as_bytes()
            .to_vec()];
        for _ in 0..rng.below(5) {
            cmd.push(
                words[rng.below(words.len() as u64) as usize]
                    .as_bytes()
                    .to_vec(),
            );
        }
        c.now += rng.below(3);
        let exec = c.engine.execute(&mut c.sessions[who], &cmd, c.now);
        assert!(exec.reply.ends_with(b"\r\n"), "{cmd:?} -> {:?}", exec.reply);
        assert!(matches!(
            exec.reply[0],
            b'+' | b'-' | b':' | b'$' | b'*' | b'%' | b'_'
        ));
        if let Some(record) = &exec.log {
            assert!(record.len() <= crate::aof::MAX_PAYLOAD);
        }
        assert!(c.sessions[who].queued() <= 3);
        if exec.close || rng.below(500) == 0 {
            c.engine.end_session(&mut c.sessions[who]);
            c.sessions[who] = Session::new(who as u64 + 1);
        }
    }
    for s in &mut c.sessions {
        c.engine.end_session(s);
    }
    assert_eq!(c.engine.watched_keys(), 0);
}

#[test]
fn a_full_queue_always_fits_in_one_log_record() {
    // Within the default byte limit a change is never larger than the
    // queued command it comes from: fill the queue with the largest values,
    // and with the most small commands.
    let value = "v".repeat(256 * 1024);
    let fillers: [&[&str]; 4] = [
        &["SET", "k", &value, "PX", "99"],
        &["MSET", "a", &value, "b", "1"],
        &["INCR", "n"],
        &["EXPIRE", "e", "100"],
    ];
    for words in fillers {
        let mut c = Clients::new(1);
        c.run(0, &["SET", "e", "1"]);
        // As many as fit, then one more: refused.
        c.run(0, &["MULTI"]);
        let mut fit = 0;
        while c.run(0, words) == QUEUED {
            fit += 1;
        }
        assert_eq!(c.run(0, &["EXEC"]), EXECABORT);
        assert!(fit >= 3, "{fit}");
        c.run(0, &["MULTI"]);
        for _ in 0..fit {
            assert_eq!(c.run(0, words), QUEUED);
        }
        let exec = c
            .engine
            .execute(&mut c.sessions[0], &args(&["EXEC"]), c.now);
        let record = exec.log.unwrap();
        assert!(record.len() <= crate::aof::MAX_PAYLOAD, "{}", words[0]);
        assert!(!String::from_utf8_lossy(&exec.reply).contains("-ERR"));
    }
}
