#!/usr/bin/env python3
"""Robustness checks against a running ftkv (default 10.0.2.15:6379): concurrency,
protocol errors, arity, pipelining, big values, backpressure, QUIT, half-close,
fuzzed input, connection churn. Run: python3 robust.py [test...]"""
import socket, time, random, sys, threading
H = ('10.0.2.15', 6379)

def conn(timeout=10):
    s = socket.create_connection(H, timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s

def cmd(*args):
    out = b'*%d\r\n' % len(args)
    for a in args:
        if isinstance(a, str): a = a.encode()
        out += b'$%d\r\n%s\r\n' % (len(a), a)
    return out

def recv_until_closed(s, limit=1<<26):
    data = b''
    while len(data) < limit:
        try:
            d = s.recv(65536)
        except ConnectionResetError:
            break
        if not d: break
        data += d
    return data

def read_replies(s, n):
    """Reads n RESP replies (simple parser)."""
    buf = b''
    out = []
    def need(k):
        nonlocal buf
        while len(buf) < k:
            d = s.recv(1 << 20)
            if not d: raise EOFError(buf)
            buf += d
    pos = 0
    def line():
        nonlocal buf, pos
        while True:
            i = buf.find(b'\r\n', pos)
            if i >= 0:
                l = buf[pos:i]; pos = i + 2; return l
            d = s.recv(1 << 20)
            if not d: raise EOFError(buf)
            buf += d
    def one():
        nonlocal pos
        l = line()
        t = l[:1]
        if t in (b'+', b'-', b':'): return l
        if t == b'$':
            n = int(l[1:])
            if n < 0: return None
            while len(buf) < pos + n + 2:
                d = s.recv(1 << 20)
                if not d: raise EOFError()
                buf_extend(d)
            v = buf[pos:pos+n]; pos += n + 2; return v
        if t == b'*':
            return [one() for _ in range(int(l[1:]))]
        raise ValueError(l)
    def buf_extend(d):
        nonlocal buf
        buf += d
    for _ in range(n):
        out.append(one())
    return out

def ping_ok():
    s = conn(); s.sendall(cmd('PING')); r = read_replies(s, 1); s.close()
    assert r == [b'+PONG'], r

results = {}
def check(name, f):
    t = time.time()
    try:
        f(); results[name] = 'ok'
        print(f'{name}: ok ({time.time()-t:.2f}s)', flush=True)
    except Exception as e:
        results[name] = f'FAIL {e!r}'[:300]
        print(f'{name}: FAIL {e!r}'[:300], flush=True)

def t_concurrent():
    N = 100
    socks = [conn() for _ in range(N)]
    for i, s in enumerate(socks):
        s.sendall(cmd('SET', f'c{i}', f'v{i}') + cmd('GET', f'c{i}') + cmd('PING'))
    for i, s in enumerate(socks):
        r = read_replies(s, 3)
        assert r == [b'+OK', f'v{i}'.encode(), b'+PONG'], r
    for s in socks: s.close()

def t_protocol_errors():
    cases = [(b'*abc\r\n', b'-ERR Protocol error: invalid multibulk length'),
             (b'*1\r\n$600000\r\n', b'-ERR Protocol error: invalid bulk length'),
             (b'*2000\r\n', b'-ERR Protocol error: invalid multibulk length'),
             (b'*1\r\n+foo\r\n', b"-ERR Protocol error: expected '$', got '+'"),
             (b'*1\r\n$3\r\nfooXX', b'-ERR Protocol error: expected CRLF'),
             (b'"unbalanced\r\n', b'-ERR Protocol error: unbalanced quotes in request'),
             (b'*99999999999999999999999999999999999999\r\n', b'-ERR Protocol error: too big count string'),
             ]
    for data, want in cases:
        s = conn(); s.sendall(data)
        got = recv_until_closed(s)
        s.close()
        assert got.startswith(want), (data, got)
    ping_ok()

def t_arity_and_unknown():
    s = conn()
    s.sendall(cmd('GET') + cmd('SET', 'k') + cmd('FOO', 'bar') + cmd('INCR', 'foo_str_key_x') + cmd('SET','sk','abc') + cmd('INCR','sk') + b'PING\r\n' + cmd('SET','k','v','EX','0') + cmd('SET','k','v','BADOPT'))
    r = read_replies(s, 9)
    s.close()
    assert r[0] == b"-ERR wrong number of arguments for 'get' command", r
    assert r[1] == b"-ERR wrong number of arguments for 'set' command", r
    assert r[2].startswith(b"-ERR unknown command 'FOO'"), r
    assert r[3].startswith(b':'), r
    assert r[4] == b'+OK' and r[5] == b'-ERR value is not an integer or out of range', r
    assert r[6] == b'+PONG', r
    assert r[7] == b"-ERR invalid expire time in 'set' command", r
    assert r[8] == b'-ERR syntax error', r

def t_pipeline():
    s = conn()
    n = 20000
    s.sendall(b''.join(cmd('INCR', 'pipe') for _ in range(n)))
    r = read_replies(s, n)
    assert r[-1] == b':%d' % (int(r[0][1:]) + n - 1), (r[0], r[-1])
    s.close()

def t_big_value():
    v = bytes(random.getrandbits(8) for _ in range(500 * 1024))
    s = conn()
    s.sendall(cmd('SET', 'big', v) + cmd('GET', 'big'))
    r = read_replies(s, 2)
    assert r[0] == b'+OK' and r[1] == v
    s.close()

def t_mget_too_large():
    s = conn()
    s.sendall(cmd('MGET', *(['big'] * 10)))
    r = read_replies(s, 1)
    assert r[0].startswith(b'-ERR reply too large'), r[0][:100]
    s.sendall(cmd('MGET', 'big', 'nokey', 'big'))
    r = read_replies(s, 1)
    assert len(r[0]) == 3 and r[0][1] is None and len(r[0][0]) == 500 * 1024
    s.close()

def t_no_reader():
    # A client that pipelines GETs of a 500 KiB value and never reads:
    # the server must stop executing for it (backpressure) and stay fine.
    s = conn()
    s.setblocking(False)
    req = cmd('GET', 'big') * 200000   # 100 GB of replies if all were built
    sent = 0
    t0 = time.time()
    while sent < len(req) and time.time() - t0 < 3:
        try:
            sent += s.send(req[sent:])
        except BlockingIOError:
            time.sleep(0.05)
    assert sent < len(req), 'the server never pushed back'
    ping_ok()
    others = [conn() for _ in range(5)]
    for o in others:
        o.sendall(cmd('GET', 'c1'))
        assert read_replies(o, 1) == [b'v1']
        o.close()
    s.close()
    ping_ok()

def t_quit():
    s = conn(); s.sendall(cmd('PING') + cmd('QUIT') + cmd('PING'))
    got = recv_until_closed(s)
    assert got == b'+PONG\r\n+OK\r\n', got
    s.close()

def t_fuzz():
    rnd = random.Random(1)
    for i in range(300):
        s = conn()
        kind = rnd.randrange(4)
        if kind == 0:
            data = bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(1, 3000)))
        elif kind == 1:
            data = b''.join(rnd.choice([b'*', b'$', b'\r\n', b'-1', b'3', b'99999', b'GET', b'SET', b'"', b"'", b'\\x4', b' ', b'\n', b'0', b'*1\r\n', b'$-1\r\n']) for _ in range(rnd.randrange(1, 200)))
        elif kind == 2:
            args = [bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(0, 20))) for _ in range(rnd.randrange(1, 8))]
            args[0] = rnd.choice([b'SET', b'GET', b'INCRBY', b'MSET', b'MGET', b'DEL', b'EXISTS', b'TTL', b'PTTL', b'SET', b'CONFIG', b'CLIENT', b'INFO', b'COMMAND', b'SELECT', b'ECHO', b'DECRBY', b'FLUSHALL' if False else b'DBSIZE'])
            data = cmd(*args)
        else:
            data = cmd('SET', 'k%d' % i, 'x', 'PX', str(rnd.randrange(-5, 5000))) + b'\r\n\r\n' + b'PING "a\\x41b" \'c\'\r\n'
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(5)
            recv_until_closed(s)
        except (ConnectionResetError, BrokenPipeError):
            pass
        s.close()
    ping_ok()

def t_many_conns_open_close():
    for round in range(3):
        socks = [conn() for _ in range(120)]
        for s in socks: s.sendall(cmd('PING'))
        for s in socks: assert read_replies(s, 1) == [b'+PONG']
        for s in socks: s.close()
        time.sleep(0.2)
    ping_ok()

def t_half_close():
    s = conn()
    s.sendall(cmd('SET', 'hc', '1') + cmd('GET', 'hc'))
    s.shutdown(socket.SHUT_WR)
    got = recv_until_closed(s)
    assert got == b'+OK\r\n$1\r\n1\r\n', got

tests = [a for a in sys.argv[1:]] or ['concurrent', 'protocol_errors', 'arity_and_unknown', 'pipeline', 'big_value', 'mget_too_large', 'no_reader', 'quit', 'half_close', 'fuzz', 'many_conns_open_close']
for t in tests:
    check(t, globals()['t_' + t])
print('SUMMARY', results)
