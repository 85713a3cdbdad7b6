"""Checks ftkv with redis-py, as a user gets it from PyPI today.

Run inside the guest's network namespace by tests/tests/ftkv_clients.rs:

    python redis_py_check.py HOST MODE [--protocol 2]

MODE is one of
  basic       connect, SET/GET/INCR/MSET/MGET/DEL/EXPIRE, pipelining
  concurrent  16 clients: INCR totals exact, every acknowledged SET read back
  hostile     hostile.py's raw-socket input, then the redis-py client still works
  raw         the bytes of HELLO 3 / GET missing, HELLO 2, HELLO 4
  transactions  r.pipeline() (MULTI/EXEC, redis-py's default), errors in
              and before EXEC, WATCH with r.transaction(), 8 clients
              incrementing one counter with WATCH retries, the queue limit
  workload    a fixed mix of writes and reads (for record/replay)
  txn-writer  writes transactions of --keys SETs (t<--writer>:<i>:<k> = i
              and --size dots) until the server is gone; prints "acked i"
              after each EXEC
  txn-check   after a crash: every transaction of txn-writer is all or
              nothing, and transactions 0..--acked of each writer are there

Without --protocol redis-py uses its default (RESP3 since redis-py 6).
REDIS_PORT=N runs the checks against a server on another port (a
redis-server 7, to check the expectations themselves).
Prints "ok: MODE ..." and exits 0 on success; an assertion names what failed.
"""

import argparse
import os
import socket
import threading

import redis

import hostile as hostile_input  # tests/clients/hostile.py, beside this file

# REDIS_PORT runs the same checks against another server (a redis-server).
PORT = int(os.environ.get("REDIS_PORT", "6379"))


def client(args, **kw):
    extra = {} if args.protocol is None else {"protocol": args.protocol}
    return redis.Redis(host=args.host, port=PORT, socket_timeout=60, **extra, **kw)


def negotiated(r):
    """The protocol version the server reports for this connection."""
    hello = r.execute_command("HELLO")
    if isinstance(hello, list):  # RESP2: a flat array of names and values
        hello = dict(zip(hello[0::2], hello[1::2]))
    return int(hello.get(b"proto", hello.get("proto")))


def basic(args):
    r = client(args)
    assert r.ping() is True
    assert r.flushall() is True
    want = 3 if args.protocol in (None, 3) else 2
    got = negotiated(r)
    assert got == want, f"negotiated RESP{got}, expected RESP{want}"
    assert r.set("greeting", "hello world") is True
    assert r.get("greeting") == b"hello world"
    assert r.get("missing") is None
    assert r.set("greeting", "x", nx=True) is None
    assert r.incr("n") == 1
    assert r.incrby("n", 41) == 42
    assert r.decr("n") == 41
    assert r.mset({"a": "1", "b": "2"}) is True
    assert r.mget("a", "b", "nope") == [b"1", b"2", None]
    assert r.delete("a", "b", "nope") == 2
    assert r.exists("a") == 0
    assert r.set("t", "v", ex=100) is True
    # Upper bounds only: a stalled host may let seconds pass in between.
    assert 0 < r.ttl("t") <= 100
    assert r.expire("t", 50) is True
    assert 0 < r.ttl("t") <= 50
    assert r.persist("t") is True
    assert r.ttl("t") == -1
    assert r.expire("missing", 5) is False
    assert r.pexpire("t", 1) is True
    info = r.info()
    assert info["redis_version"].startswith("7."), info
    assert r.config_get("appendfsync") == {"appendfsync": "always"}
    assert isinstance(r.client_id(), int)
    assert r.client_setname("matrix") is True
    assert r.client_getname() in ("matrix", b"matrix")
    try:
        r.incr("greeting")
        raise AssertionError("INCR of a string succeeded")
    except redis.ResponseError as e:
        assert "not an integer" in str(e), e
    try:
        r.execute_command("SELECT", "1")
        raise AssertionError("SELECT 1 succeeded")
    except redis.ResponseError as e:
        assert "DB index is out of range" in str(e), e
    # Pipelining: 2,000 commands in one round trip.
    p = r.pipeline(transaction=False)
    for i in range(1000):
        p.set(f"p{i}", i)
        p.incr("pc")
    replies = p.execute()
    assert replies[0::2] == [True] * 1000
    assert replies[1::2] == list(range(1, 1001))
    p = r.pipeline(transaction=False)
    for i in range(1000):
        p.get(f"p{i}")
    assert p.execute() == [str(i).encode() for i in range(1000)]
    assert r.mget([f"p{i}" for i in range(0, 1000, 100)]) == [
        str(i).encode() for i in range(0, 1000, 100)
    ]
    print(f"ok: basic RESP{got}, redis-py {redis.__version__}")


def concurrent(args):
    clients, rounds = 16, 300
    acked = [[] for _ in range(clients)]
    errors = []

    def work(c):
        try:
            r = client(args)
            for i in range(rounds):
                r.incr("shared")
                r.incr(f"own{c % 4}")
                if r.set(f"k{c}-{i}", f"v{c}-{i}") is True:
                    acked[c].append(i)
        except Exception as e:  # reported below, the test fails
            errors.append(f"client {c}: {e!r}")

    threads = [threading.Thread(target=work, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    r = client(args)
    assert r.get("shared") == str(clients * rounds).encode(), r.get("shared")
    for k in range(4):
        assert r.get(f"own{k}") == str(clients // 4 * rounds).encode()
    for c in range(clients):
        assert len(acked[c]) == rounds, f"client {c}: {len(acked[c])} SETs acknowledged"
        keys = [f"k{c}-{i}" for i in acked[c]]
        assert r.mget(keys) == [f"v{c}-{i}".encode() for i in acked[c]], f"client {c}"
    print(f"ok: concurrent {clients} clients x {rounds}")


def hostile(args):
    r = client(args)
    assert r.set("survivor", "yes") is True
    hostile_input.attack(args.host, connections=2000)
    # The redis-py client connected before all this still works.
    assert r.get("survivor") == b"yes"
    assert r.incr("after") == 1
    assert client(args).get("key") is None
    print("ok: hostile")


def raw(args):
    def session(*requests):
        s = socket.create_connection((args.host, PORT), timeout=30)
        out = []
        for req in requests:
            s.sendall(req)
            out.append(read_reply_full(s))
        s.close()
        return out

    hello3, missing = session(b"HELLO 3\r\n", b"GET missing\r\n")
    assert hello3.startswith(b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n"), hello3
    assert b"$5\r\nproto\r\n:3\r\n" in hello3, hello3
    assert missing == b"_\r\n", missing
    (hello2, missing2) = session(b"HELLO 2\r\n", b"GET missing\r\n")
    assert hello2.startswith(b"*14\r\n$6\r\nserver\r\n"), hello2
    assert b"$5\r\nproto\r\n:2\r\n" in hello2, hello2
    assert missing2 == b"$-1\r\n", missing2
    (hello4, ping) = session(b"HELLO 4\r\n", b"PING\r\n")
    assert hello4 == b"-NOPROTO unsupported protocol version\r\n", hello4
    assert ping == b"+PONG\r\n", ping
    print("ok: raw")


def read_reply_full(s):
    """Reads until the reply's last line: enough for the replies above."""
    s.settimeout(30)
    data = b""
    while True:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
        if data[:1] in (b"%", b"*"):
            if data.endswith(b"$7\r\nmodules\r\n*0\r\n"):
                return data
        elif data.endswith(b"\r\n"):
            return data


def transactions(args):
    r = client(args)
    assert r.flushall() is True
    # r.pipeline() is transactional by default: MULTI ... EXEC.
    p = r.pipeline()
    p.set("a", 1).incr("a").get("a").mget("a", "zz").delete("zz")
    p.mset({"m1": "x", "m2": "y"}).expire("a", 100).ttl("a")
    assert p.execute() == [True, 2, b"2", [b"2", None], 0, True, True, 100]
    # An error when a command runs: the others are done, redis-py raises.
    r.set("s", "text")
    p = r.pipeline()
    p.set("b", 2).incr("s").get("b")
    try:
        p.execute()
        raise AssertionError("INCR of a string inside EXEC succeeded")
    except redis.ResponseError as e:
        assert "not an integer" in str(e), e
    assert r.get("b") == b"2"
    p = r.pipeline()
    p.set("b", 3).incr("s").get("b")
    replies = p.execute(raise_on_error=False)
    assert replies[0] is True and replies[2] == b"3", replies
    assert isinstance(replies[1], redis.ResponseError), replies
    # An error while queueing: nothing is done.
    p = r.pipeline()
    p.set("c", 3).execute_command("NOSUCH", "x")
    try:
        p.execute()
        raise AssertionError("EXEC after an unknown command succeeded")
    except redis.ResponseError as e:
        assert "unknown command" in str(e), e
    assert r.get("c") is None
    # WATCH: a change by another client aborts EXEC (WatchError).
    with r.pipeline() as p:
        p.watch("w")
        assert p.get("w") is None
        client(args).set("w", "other")
        p.multi()
        p.set("w", "mine")
        try:
            p.execute()
            raise AssertionError("EXEC ran although a watched key changed")
        except redis.WatchError:
            pass
    assert r.get("w") == b"other"

    # Optimistic locking: 8 clients add 1 to a counter 50 times each with
    # WATCH/GET/MULTI/SET/EXEC, retrying when EXEC aborts.
    writers, rounds = 8, 50
    errors = []
    retries = [0]

    def add_one(pipe):
        value = int(pipe.get("counter") or 0)
        pipe.multi()
        pipe.set("counter", value + 1)

    def work():
        try:
            c = client(args)
            for _ in range(rounds):
                c.transaction(add_one, "counter")
        except Exception as e:  # reported below, the test fails
            errors.append(repr(e))

    threads = [threading.Thread(target=work) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert r.get("counter") == str(writers * rounds).encode(), r.get("counter")

    # A big transaction within the limits, then (ftkv only: Redis has no
    # limit) one over them (10,000 queued commands): refused as a whole.
    p = r.pipeline()
    for i in range(5000):
        p.set(f"big{i}", i)
    assert p.execute() == [True] * 5000
    if not r.info("server")["redis_version"].endswith("-ftkv"):
        print("ok: transactions (no queue limit on this server)")
        return
    p = r.pipeline()
    for i in range(10001):
        p.set(f"over{i}", i)
    try:
        p.execute()
        raise AssertionError("a transaction of 10,001 commands succeeded")
    except redis.ResponseError as e:
        assert "transaction too large" in str(e), e
    assert r.exists("over0", "over9999") == 0
    assert r.get("big4999") == b"4999"
    print(f"ok: transactions, {writers} clients x {rounds} WATCH increments")


def txn_writer(args):
    r = client(args)
    i = 0
    try:
        while True:
            p = r.pipeline()
            for k in range(args.keys):
                p.set(f"t{args.writer}:{i}:{k}", txn_value(args, i))
            assert p.execute() == [True] * args.keys
            print(f"acked {i}", flush=True)
            i += 1
    except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
        print(f"stopped: {e!r}", flush=True)


def txn_value(args, i):
    return f"{i}" + "." * args.size


def txn_check(args):
    r = client(args)
    for writer, acked in enumerate(args.acked):
        i, absent_run, found = 0, 0, 0
        # Past the last acknowledged one, transactions may be there (done
        # but not acknowledged) or not; look until 100 in a row are absent.
        while i < acked or absent_run < 100:
            keys = [f"t{writer}:{i}:{k}" for k in range(args.keys)]
            values = r.mget(keys)
            present = sum(v is not None for v in values)
            assert present in (0, args.keys), f"writer {writer} transaction {i}: {present} of {args.keys} keys"
            if present:
                assert values == [txn_value(args, i).encode()] * args.keys, (writer, i)
                found += 1
                absent_run = 0
            else:
                assert i >= acked, f"writer {writer}: acknowledged transaction {i} lost"
                absent_run += 1
            i += 1
        print(f"writer {writer}: {acked} acknowledged, {found} present")
    print(f"ok: txn-check {args.acked}")


def workload(args):
    r = client(args)
    assert r.flushall() is True
    assert negotiated(r) == (3 if args.protocol in (None, 3) else 2)
    for i in range(300):
        assert r.set(f"k{i}", "v" * (i + 1)) is True
        assert r.incr("n") == i + 1
        if i % 10 == 0:
            assert r.expire(f"k{i}", 1000) is True
            assert r.get("nope") is None
    p = r.pipeline(transaction=False)
    for i in range(500):
        p.mset({f"m{i}": i, f"m{i}b": i})
    assert p.execute() == [True] * 500
    for i in range(50):
        p = r.pipeline()
        p.incr("n").set(f"x{i}", i).expire(f"k{i}", 500).get("n")
        assert p.execute() == [301 + i, True, True, str(301 + i).encode()]
    assert r.transaction(lambda pipe: pipe.multi() or pipe.incr("n"), "n") == [351]
    print("ok: workload")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    modes = ["basic", "concurrent", "hostile", "raw", "transactions", "workload"]
    ap.add_argument("mode", choices=modes + ["txn-writer", "txn-check"])
    ap.add_argument("--protocol", type=int, choices=[2, 3])
    ap.add_argument("--keys", type=int, default=5, help="SETs per transaction (txn-*)")
    ap.add_argument("--size", type=int, default=0, help="padding of each value (txn-*)")
    ap.add_argument("--writer", type=int, default=0, help="txn-writer's number")
    ap.add_argument(
        "--acked",
        type=lambda s: [int(n) for n in s.split(",")],
        default=[],
        help="txn-check: acknowledged transactions per writer, comma separated",
    )
    args = ap.parse_args()
    globals()[args.mode.replace("-", "_")](args)


if __name__ == "__main__":
    main()
