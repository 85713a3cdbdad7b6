#!/usr/bin/env python3
"""Fills the disk of a running ftkv (boot it with a small disk, e.g. 1M) until
`-ERR disk full`, then checks that reads and small writes that still fit work."""
import os
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'robust.py')).read().split("tests = [")[0])
s = conn()
v = b'x' * 10000
n_ok = 0
while True:
    s.sendall(cmd('SET', 'k%d' % n_ok, v))
    r = read_replies(s, 1)[0]
    if r != b'+OK':
        print('after', n_ok, 'writes:', r); break
    n_ok += 1
s.sendall(cmd('GET', 'k0') + cmd('DBSIZE') + cmd('SET', 'tiny', '1') + cmd('INCR', 'k1') + cmd('DEL','k0') + cmd('INFO','persistence'))
r = read_replies(s, 6)
print(len(r[0]) if r[0] else None, r[1:5]); print(r[5].decode())
