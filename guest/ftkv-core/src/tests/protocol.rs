//! HELLO, RESP3 replies and the connection commands clients send on
//! connect. Expected bytes are what a Redis 7.0 server sends for the same
//! commands (checked against redis-server 7.0.15), with ftkv's version.

use super::args;
use crate::engine::{Engine, Session};
use crate::resp::Protocol;

/// One connection: commands run in its session, in order.
struct Conn {
    engine: Engine,
    session: Session,
}

impl Conn {
    fn new() -> Self {
        Conn {
            engine: Engine::default(),
            session: Session::new(7),
        }
    }

    fn run(&mut self, words: &[&str]) -> String {
        let exec = self.engine.execute(&mut self.session, &args(words), 1000);
        String::from_utf8(exec.reply).unwrap()
    }

    fn check(&mut self, words: &[&str], expected: &str) {
        assert_eq!(self.run(words), expected, "{words:?}");
    }

    /// Runs each command in order and checks its reply.
    fn script(&mut self, steps: &[(&[&str], &str)]) {
        for (words, expected) in steps {
            self.check(words, expected);
        }
    }
}

fn server_map(proto: i64) -> String {
    let head = if proto == 3 { "%7" } else { "*14" };
    format!(
        "{head}\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$10\r\n7.0.0-ftkv\r\n\
         $5\r\nproto\r\n:{proto}\r\n$2\r\nid\r\n:7\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n\
         $4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n"
    )
}

#[test]
fn hello_switches_the_protocol_and_answers_the_server_map() {
    let mut c = Conn::new();
    // Without a version: the map in the current protocol, nothing changes.
    c.script(&[
        (&["HELLO"], &server_map(2)),
        (&["GET", "missing"], "$-1\r\n"),
        (&["hello", "3"], &server_map(3)),
    ]);
    assert_eq!(c.session.protocol(), Protocol::Resp3);
    c.script(&[
        (&["GET", "missing"], "_\r\n"),
        (&["HELLO"], &server_map(3)),
        (&["HELLO", "2"], &server_map(2)),
        (&["GET", "missing"], "$-1\r\n"),
    ]);
}

#[test]
fn hello_refuses_bad_versions_and_options_without_changing_anything() {
    let mut c = Conn::new();
    for v in ["4", "1", "0", "-1", "9223372036854775807"] {
        c.check(&["HELLO", v], "-NOPROTO unsupported protocol version\r\n");
    }
    for v in ["x", "3.0", " 3", "+3", "99999999999999999999"] {
        c.check(
            &["HELLO", v],
            "-ERR Protocol version is not an integer or out of range\r\n",
        );
    }
    let refused: &[(&[&str], &str)] = &[
        (
            &["HELLO", "3", "FOO"],
            "-ERR Syntax error in HELLO option 'FOO'\r\n",
        ),
        (
            &["HELLO", "3", "AUTH", "default"],
            "-ERR Syntax error in HELLO option 'AUTH'\r\n",
        ),
        (
            &["HELLO", "3", "SETNAME"],
            "-ERR Syntax error in HELLO option 'SETNAME'\r\n",
        ),
        (
            &["HELLO", "3", "SETNAME", "a b"],
            "-ERR Client names cannot contain spaces, newlines or special characters.\r\n",
        ),
        (
            &["HELLO", "3", "AUTH", "bob", "pw"],
            "-WRONGPASS invalid username-password pair or user is disabled.\r\n",
        ),
        // An option that holds CR LF cannot break the reply framing.
        (
            &["HELLO", "3", "x\r\ny"],
            "-ERR Syntax error in HELLO option 'x  y'\r\n",
        ),
    ];
    for (cmd, reply) in refused {
        c.check(cmd, reply);
    }
    // A failed HELLO leaves the connection as it was.
    assert_eq!(c.session.protocol(), Protocol::Resp2);
    assert_eq!(c.session.name(), None);
}

#[test]
fn hello_with_auth_and_setname() {
    let mut c = Conn::new();
    c.check(
        &[
            "HELLO", "3", "AUTH", "default", "anything", "SETNAME", "app-1",
        ],
        &server_map(3),
    );
    assert_eq!(c.session.name(), Some(&b"app-1"[..]));
    c.check(&["CLIENT", "GETNAME"], "$5\r\napp-1\r\n");
    // An empty name clears it.
    c.check(&["HELLO", "3", "setname", ""], &server_map(3));
    c.check(&["CLIENT", "GETNAME"], "_\r\n");
}

#[test]
fn resp3_replies_of_every_command() {
    let mut c = Conn::new();
    c.script(&[
        (&["HELLO", "3"], &server_map(3)),
        (&["PING"], "+PONG\r\n"),
        (&["PING", "hi"], "$2\r\nhi\r\n"),
        (&["ECHO", "e"], "$1\r\ne\r\n"),
        (&["SET", "k", "v"], "+OK\r\n"),
        (&["SET", "k", "w", "NX"], "_\r\n"),
        (&["SET", "n", "w", "XX"], "_\r\n"),
        (&["GET", "k"], "$1\r\nv\r\n"),
        (&["MGET", "k", "nope"], "*2\r\n$1\r\nv\r\n_\r\n"),
        (&["MSET", "a", "1", "b", "2"], "+OK\r\n"),
        (&["INCR", "a"], ":2\r\n"),
        (&["DECRBY", "a", "5"], ":-3\r\n"),
        (&["EXISTS", "a", "nope"], ":1\r\n"),
        (&["DEL", "a", "nope"], ":1\r\n"),
        (&["EXPIRE", "k", "10"], ":1\r\n"),
        (&["TTL", "k"], ":10\r\n"),
        (&["PTTL", "k"], ":10000\r\n"),
        (&["PERSIST", "k"], ":1\r\n"),
        (&["DBSIZE"], ":2\r\n"),
        (
            &["CONFIG", "GET", "append*"],
            "%2\r\n$10\r\nappendonly\r\n$3\r\nyes\r\n$11\r\nappendfsync\r\n$6\r\nalways\r\n",
        ),
        (&["CONFIG", "GET", "nomatch"], "%0\r\n"),
        (&["COMMAND", "DOCS"], "%0\r\n"),
        (&["COMMAND", "INFO", "get"], "*1\r\n_\r\n"),
        (&["COMMAND"], "*0\r\n"),
        (&["CLIENT", "GETNAME"], "_\r\n"),
        (&["CLIENT", "ID"], ":7\r\n"),
        (&["SELECT", "0"], "+OK\r\n"),
        (&["FLUSHALL"], "+OK\r\n"),
        (&["INCR", "x"], ":1\r\n"),
        (
            &["NOPE"],
            "-ERR unknown command 'NOPE', with args beginning with: \r\n",
        ),
    ]);
    // INFO is a verbatim string: `=<len>\r\ntxt:<text>\r\n`.
    let info = c.run(&["INFO", "keyspace"]);
    let text = "# Keyspace\r\ndb0:keys=1,expires=0,avg_ttl=0\r\n";
    assert_eq!(info, format!("={}\r\ntxt:{text}\r\n", text.len() + 4));
    c.check(&["QUIT"], "+OK\r\n");
}

#[test]
fn info_in_resp2_is_a_bulk_string() {
    let mut c = Conn::new();
    c.script(&[
        (&["INFO", "nosuchsection"], "$0\r\n\r\n"),
        (&["HELLO", "3"], &server_map(3)),
        (&["INFO", "nosuchsection"], "=4\r\ntxt:\r\n"),
    ]);
}

#[test]
fn connection_commands_clients_send_on_connect() {
    let mut c = Conn::new();
    c.check(&["CLIENT", "SETINFO", "LIB-NAME", "redis-py"], "+OK\r\n");
    c.check(&["CLIENT", "SETINFO", "lib-ver", "8.0.1"], "+OK\r\n");
    assert_eq!(
        c.session.library(),
        (Some(&b"redis-py"[..]), Some(&b"8.0.1"[..]))
    );
    c.script(&[
        (
            &["CLIENT", "SETINFO", "lib-name", "a b"],
            "-ERR lib-name cannot contain spaces, newlines or special characters.\r\n",
        ),
        (
            &["CLIENT", "SETINFO", "color", "red"],
            "-ERR Unrecognized option 'color'\r\n",
        ),
        (
            &["CLIENT", "SETINFO", "lib-name"],
            "-ERR wrong number of arguments for 'client|setinfo' command\r\n",
        ),
        (&["CLIENT", "SETNAME", "worker"], "+OK\r\n"),
        (&["CLIENT", "GETNAME"], "$6\r\nworker\r\n"),
        (&["CLIENT", "SETNAME", ""], "+OK\r\n"),
        (&["CLIENT", "GETNAME"], "$-1\r\n"),
        (&["CLIENT", "ID"], ":7\r\n"),
        (
            &["CLIENT", "ID", "x"],
            "-ERR wrong number of arguments for 'client|id' command\r\n",
        ),
        (
            &["CLIENT", "GETNAME", "x"],
            "-ERR wrong number of arguments for 'client|getname' command\r\n",
        ),
        (&["SELECT", "0"], "+OK\r\n"),
        (&["SELECT", "1"], "-ERR DB index is out of range\r\n"),
        (&["SELECT", "-1"], "-ERR DB index is out of range\r\n"),
        (
            &["SELECT", "x"],
            "-ERR value is not an integer or out of range\r\n",
        ),
    ]);
    c.check(
        &["AUTH", "secret"],
        "-ERR AUTH <password> called without any password configured for the default user. \
         Are you sure your configuration is correct?\r\n",
    );
    c.script(&[
        (&["AUTH", "default", "secret"], "+OK\r\n"),
        (
            &["AUTH", "bob", "secret"],
            "-WRONGPASS invalid username-password pair or user is disabled.\r\n",
        ),
        (&["AUTH", "a", "b", "c"], "-ERR syntax error\r\n"),
        (
            &["AUTH"],
            "-ERR wrong number of arguments for 'auth' command\r\n",
        ),
    ]);
}

#[test]
fn expire_family_matches_redis() {
    let mut c = Conn::new();
    c.script(&[
        (&["SET", "k", "v"], "+OK\r\n"),
        (&["EXPIRE", "nope", "10"], ":0\r\n"),
        (
            &["EXPIRE", "k", "10", "NX", "XX"],
            "-ERR NX and XX, GT or LT options at the same time are not compatible\r\n",
        ),
        (
            &["EXPIRE", "k", "10", "GT", "LT"],
            "-ERR GT and LT options at the same time are not compatible\r\n",
        ),
        (
            &["EXPIRE", "k", "10", "FOO"],
            "-ERR Unsupported option FOO\r\n",
        ),
        (
            &["EXPIRE", "k", "x"],
            "-ERR value is not an integer or out of range\r\n",
        ),
        (
            &["EXPIRE", "k", "9223372036854775807"],
            "-ERR invalid expire time in 'expire' command\r\n",
        ),
    ]);
    // No expiry counts as infinite: GT never applies, LT always does.
    c.script(&[
        (&["EXPIRE", "k", "10", "GT"], ":0\r\n"),
        (&["EXPIRE", "k", "10", "XX"], ":0\r\n"),
        (&["EXPIRE", "k", "100", "NX"], ":1\r\n"),
        (&["EXPIRE", "k", "50", "NX"], ":0\r\n"),
        (&["EXPIRE", "k", "50", "GT"], ":0\r\n"),
        (&["EXPIRE", "k", "200", "gt"], ":1\r\n"),
        (&["PEXPIRE", "k", "5000", "LT"], ":1\r\n"),
        (&["PTTL", "k"], ":5000\r\n"),
    ]);
    // Absolute times (the clock is at 1000 ms).
    c.script(&[
        (&["PEXPIREAT", "k", "9000"], ":1\r\n"),
        (&["PTTL", "k"], ":8000\r\n"),
        (&["EXPIREAT", "k", "20"], ":1\r\n"),
        (&["PTTL", "k"], ":19000\r\n"),
        (&["GET", "k"], "$1\r\nv\r\n"),
        (&["PERSIST", "k"], ":1\r\n"),
        (&["PERSIST", "k"], ":0\r\n"),
        (&["TTL", "k"], ":-1\r\n"),
    ]);
    // A time already past deletes the key.
    c.script(&[
        (&["EXPIRE", "k", "0"], ":1\r\n"),
        (&["EXISTS", "k"], ":0\r\n"),
        (&["SET", "j", "v"], "+OK\r\n"),
        (&["PEXPIREAT", "j", "-5"], ":1\r\n"),
        (&["GET", "j"], "$-1\r\n"),
    ]);
}

#[test]
fn expire_is_logged_as_the_new_state_and_replays() {
    let mut live = Conn::new();
    let mut replica = Engine::default();
    for cmd in [
        &["SET", "a", "1"][..],
        &["SET", "b", "2"],
        &["EXPIRE", "a", "30"],
        &["EXPIRE", "b", "0"],
        &["SET", "c", "3", "EX", "5"],
        &["PERSIST", "c"],
        &["EXPIRE", "missing", "5"],
    ] {
        let exec = live.engine.execute(&mut live.session, &args(cmd), 1000);
        if let Some(record) = exec.log {
            replica.apply_record(&record, crate::aof::VERSION).unwrap();
        }
    }
    let dump = |e: &Engine| {
        e.entries()
            .map(|(k, v, t)| (k.to_vec(), v.to_vec(), t))
            .collect::<Vec<_>>()
    };
    assert_eq!(dump(&replica), dump(&live.engine));
    assert_eq!(
        dump(&replica),
        vec![
            (b"a".to_vec(), b"1".to_vec(), Some(31_000)),
            (b"c".to_vec(), b"3".to_vec(), None),
        ]
    );
}

#[test]
fn random_commands_in_both_protocols_never_panic() {
    let mut rng = super::Rng(0x5eed);
    let words = [
        "HELLO",
        "2",
        "3",
        "4",
        "AUTH",
        "default",
        "SETNAME",
        "CLIENT",
        "SETINFO",
        "lib-name",
        "GETNAME",
        "ID",
        "SELECT",
        "0",
        "1",
        "EXPIRE",
        "PEXPIREAT",
        "PERSIST",
        "NX",
        "GT",
        "LT",
        "GET",
        "SET",
        "MGET",
        "INFO",
        "CONFIG",
        "COMMAND",
        "k",
        "-1",
        "",
    ];
    let mut c = Conn::new();
    for _ in 0..20_000 {
        let n = 1 + rng.below(6) as usize;
        let cmd: Vec<&str> = (0..n)
            .map(|_| words[rng.below(words.len() as u64) as usize])
            .collect();
        let reply = c.run(&cmd);
        assert!(reply.ends_with("\r\n"), "{cmd:?} -> {reply:?}");
    }
}
