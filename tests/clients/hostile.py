"""Hostile input for ftkv on raw sockets: protocol errors, lengths meant to
make a server allocate gigabytes, a request left half-sent, junk after HELLO
3, and thousands of connections opened and closed. Each protocol error must
be answered with -ERR and cost only that connection.

    python hostile.py HOST          (or hostile.attack(HOST) from a script)

Prints "hostile: done" and exits 0 when ftkv answered everything and still
answers PING.
"""

import socket
import sys

PORT = 6379


def connect(host):
    return socket.create_connection((host, PORT), timeout=30)


def read_line(s):
    """Bytes up to a CRLF at the end (or until the peer closes)."""
    s.settimeout(30)
    data = b""
    try:
        while not data.endswith(b"\r\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        pass
    return data


def send_and_read(host, payload):
    s = connect(host)
    s.sendall(payload)
    reply = read_line(s)
    s.close()
    return reply


def attack(host, connections=10000):
    # Binary junk is read as inline commands: unknown-command errors.
    reply = send_and_read(host, bytes(range(256)) * 4)
    assert reply.startswith(b"-ERR unknown command"), reply[:80]
    for payload in [
        b"*1\r\n$2147483648\r\n",
        b"*2147483647\r\n",
        b"*1\r\n:1\r\n",
        b'GET "unbalanced\r\n',
        b"*3\r\n$5\r\nHELLO\r\n$1\r\n3\r\n$-5\r\n",
    ]:
        reply = send_and_read(host, payload)
        assert reply.startswith(b"-ERR Protocol error"), (payload[:40], reply)
    # After HELLO 3 the parser is just as strict.
    s = connect(host)
    s.sendall(b"HELLO 3\r\n")
    assert read_line(s).startswith(b"%7\r\n")
    s.sendall(b"*1\r\n$99999999\r\n")
    reply = b""
    while b"Protocol error" not in reply:
        chunk = s.recv(4096)
        assert chunk, reply
        reply += chunk
    s.close()
    # A request left half-sent, then many connections opened and closed.
    s = connect(host)
    s.sendall(b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$10\r\nabc")
    s.close()
    for _ in range(connections):
        connect(host).close()
    assert send_and_read(host, b"PING\r\n") == b"+PONG\r\n"


if __name__ == "__main__":
    attack(sys.argv[1])
    print("hostile: done")
