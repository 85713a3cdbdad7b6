//! A linearizability checker for one register (Wing & Gong's search with
//! Lowe's memoization): is there an order of the operations, consistent
//! with their real-time order, in which every read returns the value of the
//! latest write before it? A history is checked key by key (registers
//! compose). Operations that never returned may take effect at any point
//! after they began, or not at all.

use std::collections::HashSet;

/// One operation on a register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// Invocation and completion times (any monotonic unit); `None`: no
    /// answer came (it may or may not have taken effect).
    pub call: u64,
    pub ret: Option<u64>,
    pub kind: OpKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    Write(String),
    /// A read and the value it returned (`None`: the key did not exist).
    Read(Option<String>),
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order exists; the operations of the longest consistent prefix
    /// found, and the first one that could not be placed.
    Violation(String),
    /// The search gave up (too many states); nothing is claimed.
    Unknown,
}

/// Checks one register's history, starting from `initial`. The search is
/// Wing & Gong's over a linked list of call and return events (as in
/// Porcupine), with Lowe's cache of (operations placed, register value).
pub fn check(ops: &[Op], initial: Option<String>, max_states: usize) -> Verdict {
    let n = ops.len();
    if n == 0 {
        return Verdict::Linearizable;
    }
    // Events: a call and a return per op (a missing return is at infinity).
    // At equal times returns come first: an op that returned at t did not
    // overlap one called at t.
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, op) in ops.iter().enumerate() {
        events.push((op.call, true, i));
        events.push((op.ret.unwrap_or(u64::MAX), false, i));
    }
    events.sort_by_key(|&(t, is_call, i)| (t, is_call, i));
    let len = events.len();
    // A doubly linked list over event slots; `len` is the end marker.
    let mut next: Vec<usize> = (1..=len).collect();
    let mut prev: Vec<usize> = (0..len).map(|k| k.wrapping_sub(1)).collect();
    let mut head = 0usize;
    let mut ret_slot = vec![0usize; n];
    let mut call_slot = vec![0usize; n];
    for (k, &(_, is_call, i)) in events.iter().enumerate() {
        if is_call {
            call_slot[i] = k;
        } else {
            ret_slot[i] = k;
        }
    }
    let words = n.div_ceil(64);
    let mut placed = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<String>)> = Vec::new();
    let mut value = initial;
    let mut entry = head;
    let mut states = 0usize;
    let mut best = 0usize;
    // Removes slot k from the list.
    let unlink = |k: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>, head: &mut usize| {
        let (p, q) = (prev[k], next[k]);
        if p == usize::MAX {
            *head = q;
        } else {
            next[p] = q;
        }
        if q < len {
            prev[q] = p;
        }
    };
    let relink = |k: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>, head: &mut usize| {
        let (p, q) = (prev[k], next[k]);
        if p == usize::MAX {
            *head = k;
        } else {
            next[p] = k;
        }
        if q < len {
            prev[q] = k;
        }
    };
    loop {
        if head == len {
            return Verdict::Linearizable;
        }
        states += 1;
        if states > max_states {
            return Verdict::Unknown;
        }
        if entry == len {
            // Only reachable past the last return: nothing left to try here.
            entry = head;
        }
        let (_, is_call, i) = events[entry];
        if is_call {
            let op = &ops[i];
            let ok = match &op.kind {
                OpKind::Write(_) => true,
                OpKind::Read(v) => *v == value,
            };
            if ok {
                let new_value = match &op.kind {
                    OpKind::Write(v) => Some(v.clone()),
                    OpKind::Read(_) => value.clone(),
                };
                placed[i / 64] |= 1 << (i % 64);
                if cache.insert((placed.clone(), new_value.clone())) {
                    stack.push((i, value.clone()));
                    value = new_value;
                    unlink(call_slot[i], &mut next, &mut prev, &mut head);
                    unlink(ret_slot[i], &mut next, &mut prev, &mut head);
                    best = best.max(stack.len());
                    entry = head;
                    continue;
                }
                placed[i / 64] &= !(1 << (i % 64));
            }
            entry = next[entry];
        } else {
            // A return whose op is not placed: backtrack.
            let Some((j, old)) = stack.pop() else {
                let first = head;
                let stuck = format!("{:?}", ops[events[first].2]);
                return Verdict::Violation(format!(
                    "no order places more than {best} of {n} operations; stuck at {stuck}"
                ));
            };
            placed[j / 64] &= !(1 << (j % 64));
            value = old;
            relink(ret_slot[j], &mut next, &mut prev, &mut head);
            relink(call_slot[j], &mut next, &mut prev, &mut head);
            entry = next[call_slot[j]];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(call: u64, ret: Option<u64>, v: &str) -> Op {
        Op {
            call,
            ret,
            kind: OpKind::Write(v.into()),
        }
    }
    fn r(call: u64, ret: u64, v: Option<&str>) -> Op {
        Op {
            call,
            ret: Some(ret),
            kind: OpKind::Read(v.map(str::to_string)),
        }
    }

    #[test]
    fn concurrent_writes_may_take_either_order() {
        let h = [
            w(0, Some(10), "a"),
            w(1, Some(9), "b"),
            r(11, 12, Some("a")),
        ];
        assert_eq!(check(&h, None, 100_000), Verdict::Linearizable);
        let h = [
            w(0, Some(10), "a"),
            w(1, Some(9), "b"),
            r(11, 12, Some("b")),
        ];
        assert_eq!(check(&h, None, 100_000), Verdict::Linearizable);
    }

    #[test]
    fn a_lost_acknowledged_write_is_caught() {
        // "b" was acknowledged before the read began, yet the read saw "a".
        let h = [w(0, Some(1), "a"), w(2, Some(3), "b"), r(4, 5, Some("a"))];
        assert!(matches!(check(&h, None, 100_000), Verdict::Violation(_)));
        // A read of a value nobody wrote.
        let h = [w(0, Some(1), "a"), r(2, 3, Some("z"))];
        assert!(matches!(check(&h, None, 100_000), Verdict::Violation(_)));
    }

    #[test]
    fn an_unanswered_write_may_or_may_not_have_happened() {
        let h = [
            w(0, Some(1), "a"),
            w(2, None, "b"),
            r(5, 6, Some("b")),
            r(7, 8, Some("b")),
        ];
        assert_eq!(check(&h, None, 100_000), Verdict::Linearizable);
        let h = [w(0, Some(1), "a"), w(2, None, "b"), r(5, 6, Some("a"))];
        assert_eq!(check(&h, None, 100_000), Verdict::Linearizable);
        // ...but once seen, it cannot be unseen.
        let h = [
            w(0, Some(1), "a"),
            w(2, None, "b"),
            r(5, 6, Some("b")),
            r(7, 8, Some("a")),
        ];
        assert!(matches!(check(&h, None, 100_000), Verdict::Violation(_)));
    }
}

#[cfg(test)]
mod scale {
    use super::*;

    /// Eight clients, each sequential, sharing one register: thousands of
    /// operations must check quickly.
    #[test]
    fn a_long_history_of_eight_clients_checks() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // Simulate: a global clock; each op takes effect at a random point
        // inside its interval; the register follows the effect order.
        let mut events: Vec<(u64, usize, Op)> = Vec::new();
        let mut next_free = [0u64; 8];
        for i in 0..6000u64 {
            let c = (i % 8) as usize;
            let call = next_free[c] + rng.gen_range(0..5);
            let ret = call + rng.gen_range(1..40);
            let effect = rng.gen_range(call..ret);
            next_free[c] = ret + 1;
            let kind = if rng.gen_bool(0.6) {
                OpKind::Write(format!("v{i}"))
            } else {
                OpKind::Read(None)
            };
            events.push((
                effect,
                c,
                Op {
                    call,
                    ret: Some(ret),
                    kind,
                },
            ));
        }
        events.sort_by_key(|e| e.0);
        let mut value: Option<String> = None;
        let mut ops = Vec::new();
        for (_, _, mut op) in events {
            match &op.kind {
                OpKind::Write(v) => value = Some(v.clone()),
                OpKind::Read(_) => op.kind = OpKind::Read(value.clone()),
            }
            ops.push(op);
        }
        let t = std::time::Instant::now();
        assert_eq!(check(&ops, None, 5_000_000), Verdict::Linearizable);
        eprintln!("6000 ops checked in {:?}", t.elapsed());
    }
}
