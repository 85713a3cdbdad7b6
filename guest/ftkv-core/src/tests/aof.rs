use super::{args, execute_resp2, Rng};
use crate::aof::{
    self, encode_header, parse_header, replay, upgrade_header, AppendError, HeaderError, LogWriter,
    PendingWrite, RecordError, ReplayReport, Replayer, TornReason, MAX_BATCH, SECTOR,
};
use crate::engine::{Engine, Session};

type Snapshot = Vec<(Vec<u8>, Vec<u8>, Option<u64>)>;

fn snapshot(e: &Engine) -> Snapshot {
    e.entries()
        .map(|(k, v, x)| (k.to_vec(), v.to_vec(), x))
        .collect()
}

fn apply(disk: &mut [u8], w: &PendingWrite) {
    assert_eq!(w.offset % SECTOR, 0);
    assert_eq!(w.data.len() as u64 % SECTOR, 0);
    disk[w.offset as usize..w.offset as usize + w.data.len()].copy_from_slice(&w.data);
}

/// A random write command.
fn random_write(rng: &mut Rng, now: u64) -> Vec<Vec<u8>> {
    let key = format!("key{}", rng.below(20));
    let value: String = (0..rng.below(40))
        .map(|_| (b'a' + rng.below(26) as u8) as char)
        .collect();
    let words: Vec<String> = match rng.below(8) {
        0 => vec![
            "SET".into(),
            key,
            value,
            "PX".into(),
            format!("{}", 1 + rng.below(50)),
        ],
        1 => vec!["INCR".into(), format!("n{}", rng.below(3))],
        2 => vec!["DEL".into(), key, format!("key{}", rng.below(20))],
        3 => vec![
            "MSET".into(),
            key,
            value.clone(),
            format!("key{}", rng.below(20)),
            value,
        ],
        4 if rng.below(10) == 0 => vec!["FLUSHALL".into()],
        5 => vec!["SET".into(), key, value, "NX".into()],
        6 => vec!["SET".into(), key, "x".repeat(rng.below(3000) as usize)],
        _ => vec!["SET".into(), key, value],
    };
    let _ = now;
    words.into_iter().map(String::into_bytes).collect()
}

struct Run {
    disk: Vec<u8>,
    engine: Engine,
    /// The one connection commands run on.
    session: Session,
    writer: LogWriter,
    now: u64,
}

impl Run {
    fn new(sectors: u64, generation: u64) -> Run {
        let mut disk = aof::blank_disk(sectors);
        let mut writer = LogWriter::format(generation, disk.len() as u64).unwrap();
        apply(&mut disk, &writer.take_pending().unwrap());
        let mut engine = Engine::default();
        engine.set_log_budget(Some(writer.remaining()));
        Run {
            disk,
            engine,
            session: Session::new(1),
            writer,
            now: 0,
        }
    }

    /// Executes a command, appending its record (if any) to the batch.
    fn exec(&mut self, cmd: &[Vec<u8>]) -> bool {
        self.now += 7;
        let exec = self.engine.execute(&mut self.session, cmd, self.now);
        match exec.log {
            Some(p) => {
                self.writer.append(&p).unwrap();
                true
            }
            None => false,
        }
    }

    fn flush(&mut self) {
        if let Some(w) = self.writer.take_pending() {
            apply(&mut self.disk, &w);
        }
    }

    /// Replays the disk into a fresh engine: a clean end where the writer
    /// is, and the same keyspace as the run's.
    fn check_replay(&self) -> ReplayReport {
        let mut fresh = Engine::default();
        let report = replay(&self.disk, &mut fresh).unwrap();
        assert_eq!(report.torn, None);
        assert_eq!(report.end, self.writer.end());
        assert_eq!(snapshot(&fresh), snapshot(&self.engine));
        report
    }
}

#[test]
fn round_trip_through_the_log() {
    let mut run = Run::new(2048, 0x1234);
    let mut rng = Rng(7);
    for batch in 0..200 {
        for _ in 0..1 + batch % 5 {
            let cmd = random_write(&mut rng, run.now);
            run.exec(&cmd);
        }
        run.flush();
    }
    let report = run.check_replay();
    assert!(report.records > 200);
    // Replaying in small pieces gives the same.
    let mut fresh2 = Engine::default();
    let mut r = Replayer::new(parse_header(&run.disk).unwrap(), run.disk.len() as u64);
    for piece in run.disk[512..].chunks(37) {
        if !r.feed(piece, &mut fresh2) {
            break;
        }
    }
    assert_eq!(r.finish(), report);
    assert_eq!(snapshot(&fresh2), snapshot(&run.engine));
}

#[test]
fn expiry_replays_as_absolute_time() {
    let mut run = Run::new(64, 9);
    run.now = 1_000;
    run.exec(&args(&["SET", "a", "1", "EX", "10"]));
    run.exec(&args(&["SET", "b", "5", "PX", "500"]));
    run.exec(&args(&["INCR", "b"]));
    run.flush();
    let mut e = Engine::default();
    replay(&run.disk, &mut e).unwrap();
    // Booted much later: the values and absolute expiry times are the same.
    assert_eq!(snapshot(&e), snapshot(&run.engine));
    assert_eq!(e.peek(b"a", 11_007), Some(&b"1"[..]));
    assert_eq!(e.peek(b"a", 11_008), None);
    // b was set at 1014 with PX 500; INCR kept its expiry.
    assert_eq!(e.peek(b"b", 1_514), Some(&b"6"[..]));
    assert_eq!(e.peek(b"b", 1_515), None);
}

/// Builds a log with some durable records, then an in-flight batch.
/// Returns (disk before the batch, the batch write, snapshots after each
/// record of the batch with the disk offset where that record ends).
fn with_in_flight_batch(
    seed: u64,
    big: bool,
) -> (Run, Vec<u8>, PendingWrite, Vec<(u64, Snapshot)>) {
    let mut run = Run::new(128, 0xfeed);
    let mut rng = Rng(seed);
    for _ in 0..20 {
        let cmd = random_write(&mut rng, run.now);
        run.exec(&cmd);
    }
    run.flush();
    let before = run.disk.clone();
    let mut states = vec![(run.writer.end(), snapshot(&run.engine))];
    let mut n = 0;
    while n < 6 {
        let cmd = if big && n == 2 {
            args(&["SET", "big", &"B".repeat(6_000)])
        } else {
            random_write(&mut rng, run.now)
        };
        if run.exec(&cmd) {
            states.push((run.writer.end(), snapshot(&run.engine)));
            n += 1;
        }
    }
    let batch = run.writer.take_pending().unwrap();
    (run, before, batch, states)
}

/// The state replay must give for `disk`: the records of the batch are
/// applied in order while each one's bytes on `disk` are exactly the bytes
/// that were meant to be written (a record whose missing tail happens to
/// equal what the disk already held is intact, not torn).
fn expected<'a>(states: &'a [(u64, Snapshot)], disk: &[u8], full: &[u8]) -> &'a (u64, Snapshot) {
    let mut want = &states[0];
    for pair in states.windows(2) {
        let (a, b) = (pair[0].0 as usize, pair[1].0 as usize);
        if disk[a..b] != full[a..b] {
            break;
        }
        want = &pair[1];
    }
    want
}

/// A crash while `batch` was being written over `before`: only its first
/// `cut` bytes arrived. The disk, and what replay makes of it.
fn crash_at(before: &[u8], batch: &PendingWrite, cut: usize) -> (Vec<u8>, Engine, ReplayReport) {
    let mut disk = before.to_vec();
    let off = batch.offset as usize;
    disk[off..off + cut].copy_from_slice(&batch.data[..cut]);
    let mut e = Engine::default();
    let report = replay(&disk, &mut e).unwrap();
    (disk, e, report)
}

#[test]
fn torn_tail_at_every_cut_is_discarded_and_the_prefix_is_exact() {
    for (seed, big) in [(1, false), (2, true)] {
        let (run, before, batch, states) = with_in_flight_batch(seed, big);
        let mut full = before.clone();
        apply(&mut full, &batch);
        for cut in 0..=batch.data.len() {
            let (mut disk, e, report) = crash_at(&before, &batch, cut);
            let want = expected(&states, &disk, &full);
            assert_eq!(snapshot(&e), want.1, "seed {seed} cut {cut}");
            assert_eq!(report.end, want.0, "seed {seed} cut {cut}");
            if cut == batch.data.len() {
                assert_eq!(report.torn, None);
            }

            // Only check resume on a sample of cuts (it is slower).
            if cut % 97 != 0 && cut != batch.data.len() {
                continue;
            }
            // After the crash: resume, write more, crash cleanly, replay again.
            let mut writer = LogWriter::resume(&report);
            let mut e2 = e;
            e2.set_log_budget(Some(writer.remaining()));
            for cmd in [args(&["SET", "after", "1"]), args(&["INCR", "n0"])] {
                let exec = execute_resp2(&mut e2, &cmd, 1_000_000);
                writer.append(&exec.log.unwrap()).unwrap();
            }
            let w = writer.take_pending().unwrap();
            assert!(
                w.offset + w.data.len() as u64
                    >= (report.end + aof::ZERO_AHEAD).min(disk.len() as u64) - SECTOR
            );
            apply(&mut disk, &w);
            let mut e3 = Engine::default();
            let r3 = replay(&disk, &mut e3).unwrap();
            assert_eq!(r3.torn, None, "cut {cut}");
            assert_eq!(snapshot(&e3), snapshot(&e2), "cut {cut}");
        }
        drop(run);
    }
}

#[test]
fn sectors_landing_out_of_order_never_misread() {
    let (_run, before, batch, states) = with_in_flight_batch(3, true);
    let sectors = batch.data.len() / SECTOR as usize;
    let mut full = before.clone();
    apply(&mut full, &batch);
    let mut rng = Rng(99);
    for _ in 0..300 {
        let mut disk = before.clone();
        for s in 0..sectors {
            let at = batch.offset as usize + s * SECTOR as usize;
            if rng.below(4) != 0 {
                disk[at..at + SECTOR as usize].copy_from_slice(&batch.data[s * 512..(s + 1) * 512]);
            }
        }
        let want = expected(&states, &disk, &full);
        let mut e = Engine::default();
        let report = replay(&disk, &mut e).unwrap();
        assert_eq!(snapshot(&e), want.1);
        assert_eq!(report.end, want.0);
    }
}

#[test]
fn stale_records_of_an_older_log_are_not_read() {
    let mut old = Run::new(256, 111);
    let mut rng = Rng(5);
    for _ in 0..100 {
        let cmd = random_write(&mut rng, old.now);
        old.exec(&cmd);
    }
    old.flush();
    // A new log (new generation) over the same disk.
    let mut disk = old.disk.clone();
    let mut writer = LogWriter::format(222, disk.len() as u64).unwrap();
    apply(&mut disk, &writer.take_pending().unwrap());
    let mut e = Engine::default();
    let exec = execute_resp2(&mut e, &args(&["SET", "new", "1"]), 0);
    writer.append(&exec.log.unwrap()).unwrap();
    apply(&mut disk, &writer.take_pending().unwrap());
    // Make the old bytes start right after the new record: no zero terminator.
    let end = writer.end() as usize;
    let old_at = 512 + 300;
    disk.copy_within(old_at..old_at + 4096, end);
    let mut replayed = Engine::default();
    let report = replay(&disk, &mut replayed).unwrap();
    assert_eq!(snapshot(&replayed), snapshot(&e));
    assert_eq!(report.records, 1);

    // Stale records of the same generation at the wrong place: rejected by seq.
    let mut run = Run::new(64, 333);
    run.exec(&args(&["SET", "a", "1"]));
    run.flush();
    let first_end = run.writer.end() as usize;
    let first = run.disk[512..first_end].to_vec();
    run.exec(&args(&["SET", "b", "2"]));
    run.flush();
    let end = run.writer.end() as usize;
    run.disk[end..end + first.len()].copy_from_slice(&first); // seq 1 again
    let mut e = Engine::default();
    let report = replay(&run.disk, &mut e).unwrap();
    assert_eq!(report.records, 2);
    assert_eq!(
        report.torn.unwrap().reason,
        TornReason::OutOfSequence {
            expected: 3,
            found: 1
        }
    );
}

#[test]
fn header_states() {
    assert_eq!(parse_header(&[0u8; 512]), Err(HeaderError::Blank));
    assert_eq!(parse_header(&[0u8; 100]), Err(HeaderError::TooShort));
    assert_eq!(parse_header(&[1u8; 512]), Err(HeaderError::BadMagic));
    let h = encode_header(77);
    assert_eq!(parse_header(&h).unwrap().generation, 77);
    let mut bad = h;
    bad[20] ^= 1;
    assert_eq!(parse_header(&bad), Err(HeaderError::BadChecksum));
    // Versions 1 and 2 are read; others are refused.
    for (version, ok) in [(0, false), (1, true), (2, true), (3, false)] {
        let h = header_of_version(77, version);
        match parse_header(&h) {
            Ok(parsed) => {
                assert!(ok, "version {version}");
                assert_eq!(parsed.version, version);
            }
            Err(e) => {
                assert!(!ok, "version {version}");
                assert_eq!(e, HeaderError::BadVersion(version));
            }
        }
    }
    assert!(LogWriter::format(0, 4096).is_none());
    assert!(LogWriter::format(1, 1000).is_none());
}

#[test]
fn disk_full_and_batches() {
    // 4 sectors: header + 1536 bytes of log.
    let mut run = Run::new(4, 5);
    let value = "v".repeat(400);
    let mut ok = 0;
    loop {
        let exec = execute_resp2(
            &mut run.engine,
            &args(&["SET", &format!("k{ok}"), &value]),
            0,
        );
        match exec.log {
            Some(p) => {
                run.writer.append(&p).unwrap();
                ok += 1;
            }
            None => {
                assert_eq!(exec.reply, b"-ERR disk full\r\n");
                break;
            }
        }
    }
    assert_eq!(ok, 3);
    assert_eq!(run.engine.log_budget(), Some(run.writer.remaining()));
    assert_eq!(run.writer.append(&[1u8; 2000]), Err(AppendError::Full));
    run.flush();
    let mut e = Engine::default();
    replay(&run.disk, &mut e).unwrap();
    assert_eq!(snapshot(&e), snapshot(&run.engine));

    // Batches are bounded.
    let mut run = Run::new(40_000, 6);
    let payload = vec![9u8; 1024 * 1024];
    let mut n = 0;
    loop {
        let exec = execute_resp2(
            &mut run.engine,
            &[
                b"SET".to_vec(),
                format!("k{n}").into_bytes(),
                payload[..500_000].to_vec(),
            ],
            0,
        );
        match run.writer.append(&exec.log.unwrap()) {
            Ok(()) => n += 1,
            Err(AppendError::BatchFull) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(n as u64 * 500_000 <= MAX_BATCH);
    assert!(run.writer.take_pending().is_some());
    assert!(run.writer.take_pending().is_none());
}

#[test]
fn random_payloads_never_panic_and_apply_all_or_nothing() {
    let mut rng = Rng(0xabc);
    let mut e = Engine::default();
    execute_resp2(&mut e, &args(&["SET", "keep", "1"]), 0);
    for _ in 0..100_000 {
        let len = rng.below(40) as usize;
        let mut p: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if let Some(op) = p.first_mut() {
            // Every op of the current version, and one unknown.
            *op = 1 + (*op % 7);
        }
        let before = snapshot(&e);
        if e.apply_record(&p, aof::VERSION).is_err() {
            assert_eq!(snapshot(&e), before);
        }
        if rng.below(100) == 0 {
            e = Engine::default();
        }
    }
}

#[test]
fn random_disk_bytes_never_panic_replay() {
    let mut rng = Rng(0x5eed);
    for _ in 0..2_000 {
        let mut disk = aof::blank_disk(4);
        disk[..512].copy_from_slice(&encode_header(1));
        for b in disk[512..].iter_mut().take(rng.below(1536) as usize) {
            *b = rng.next() as u8;
        }
        let mut e = Engine::default();
        let r = replay(&disk, &mut e).unwrap();
        assert_eq!(r.records, 0);
    }
}

/// `encode_header` with another version number (and a valid checksum).
fn header_of_version(generation: u64, version: u32) -> [u8; 512] {
    let mut h = encode_header(generation);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    let crc = crate::crc32::crc32(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A version 1 log, as written by ftkv before transactions (ftkv-core at
/// commit 1c54d3f, two sectors): `SET a 1`, `SET gone x`, `MSET b 2 c 3`,
/// `SET t ttl PXAT 4000000000000`, `INCR n`, `INCRBY n 41`, `DEL gone`,
/// `EXPIRE a 1000000000` at time 1007 (logged as a SET), `SET p persisted
/// EX 100`, `PERSIST p`, in three batches.
const V1_LOG: &[u8] = include_bytes!("v1-log.bin");

fn v1_disk(sectors: usize) -> Vec<u8> {
    let mut disk = aof::blank_disk(sectors as u64);
    disk[..V1_LOG.len()].copy_from_slice(V1_LOG);
    disk
}

fn v1_state() -> Snapshot {
    let entry =
        |k: &str, v: &str, x: Option<u64>| (k.as_bytes().to_vec(), v.as_bytes().to_vec(), x);
    vec![
        entry("a", "1", Some(1_000_000_001_007)),
        entry("b", "2", None),
        entry("c", "3", None),
        entry("n", "42", None),
        entry("p", "persisted", None),
        entry("t", "ttl", Some(4_000_000_000_000)),
    ]
}

#[test]
fn a_version_1_log_is_read_upgraded_and_extended() {
    let mut disk = v1_disk(64);
    let header = parse_header(&disk).unwrap();
    assert_eq!(header.version, 1);
    let mut engine = Engine::default();
    let report = replay(&disk, &mut engine).unwrap();
    assert_eq!(report.version, 1);
    assert_eq!(report.records, 10);
    assert_eq!(report.torn, None);
    assert_eq!(snapshot(&engine), v1_state());

    // Boot: the header becomes version 2 (same generation), then appending
    // resumes with records only version 2 has.
    let upgraded = upgrade_header(&report).unwrap();
    assert_eq!(
        parse_header(&upgraded).unwrap(),
        aof::LogHeader {
            generation: header.generation,
            version: aof::VERSION
        }
    );
    disk[..512].copy_from_slice(&upgraded);
    let mut writer = LogWriter::resume(&report);
    engine.set_log_budget(Some(writer.remaining()));
    let mut session = Session::new(1);
    for words in [
        &["MULTI"][..],
        &["SET", "a", "2"],
        &["INCR", "n"],
        &["DEL", "b"],
        &["EXPIRE", "c", "50"],
        &["EXEC"],
        &["PERSIST", "t"],
    ] {
        let exec = engine.execute(&mut session, &args(words), 2_000);
        if let Some(p) = exec.log {
            writer.append(&p).unwrap();
        }
    }
    apply(&mut disk, &writer.take_pending().unwrap());
    let mut again = Engine::default();
    let report = replay(&disk, &mut again).unwrap();
    assert_eq!((report.version, report.records, report.torn), (2, 12, None));
    assert_eq!(snapshot(&again), snapshot(&engine));
    assert_eq!(again.peek(b"n", 2_000), Some(&b"43"[..]));
    assert_eq!(again.peek(b"c", 52_000), Some(&b"3"[..]));
    assert_eq!(again.peek(b"c", 52_001), None);
    assert_eq!(upgrade_header(&report), None);

    // Without the upgrade, the version 1 header says those records cannot
    // be there: replay stops at the first, as at any invalid record.
    disk[..512].copy_from_slice(V1_LOG.get(..512).unwrap());
    let mut old = Engine::default();
    let report = replay(&disk, &mut old).unwrap();
    assert_eq!(report.records, 10);
    assert_eq!(
        report.torn.map(|t| t.reason),
        Some(TornReason::BadRecord(RecordError::UnknownOp(5)))
    );
    assert_eq!(snapshot(&old), v1_state());
}

/// Transaction payloads that must not decode, and a valid one.
#[test]
fn transaction_records_decode_whole_or_not_at_all() {
    let mut e = Engine::default();
    let mut s = Session::new(1);
    for words in [&["MULTI"][..], &["SET", "x", "1"], &["SET", "y", "2"]] {
        e.execute(&mut s, &args(words), 0);
    }
    let good = e.execute(&mut s, &args(&["EXEC"]), 0).log.unwrap();
    assert_eq!(good[0], 5);
    let mut fresh = Engine::default();
    fresh.apply_record(&good, aof::VERSION).unwrap();
    assert_eq!(snapshot(&fresh), snapshot(&e));
    // Not in a version 1 log.
    assert_eq!(
        Engine::default().apply_record(&good, 1),
        Err(RecordError::UnknownOp(5))
    );
    let nested = {
        let mut p = vec![5, 1, 0, 0, 0];
        p.extend_from_slice(&(good.len() as u32).to_le_bytes());
        p.extend_from_slice(&good);
        p
    };
    let mut trailing = good.clone();
    trailing.push(0);
    let mut short_count = good.clone();
    short_count[1] = 3;
    // The second change's last byte is cut off: the first must not apply.
    let mut cut = good.clone();
    cut.pop();
    let mut bad_second = good.clone();
    let last_op = good.len() - 12;
    bad_second[last_op] = 9;
    for (payload, error) in [
        (&[5u8, 0, 0, 0, 0][..], RecordError::EmptyTransaction),
        (&nested, RecordError::NestedTransaction),
        (&trailing, RecordError::TrailingBytes),
        (&short_count, RecordError::Truncated),
        (&cut, RecordError::Truncated),
        (&bad_second, RecordError::UnknownOp(9)),
        (&[5u8, 0xff, 0xff, 0xff, 0xff][..], RecordError::Truncated),
    ] {
        let mut target = Engine::default();
        assert_eq!(
            target.apply_record(payload, aof::VERSION),
            Err(error),
            "{payload:?}"
        );
        assert_eq!(target.entries().count(), 0, "{payload:?}");
    }
}

/// A transaction of `keys` SETs of `size`-byte values.
fn transaction(run: &mut Run, tag: &str, keys: usize, size: usize) {
    let value = tag.repeat(size);
    assert!(!run.exec(&args(&["MULTI"])));
    for k in 0..keys {
        assert!(!run.exec(&args(&["SET", &format!("{tag}{k}"), &value])));
    }
    assert!(run.exec(&args(&["EXEC"])));
}

#[test]
fn a_torn_transaction_is_all_or_nothing() {
    let mut run = Run::new(128, 0xaced);
    transaction(&mut run, "a", 3, 10);
    run.flush();
    let before = run.disk.clone();
    let states = vec![(run.writer.end(), snapshot(&run.engine))];
    // One record over several sectors, then another after it.
    transaction(&mut run, "b", 5, 700);
    let mut states = states;
    states.push((run.writer.end(), snapshot(&run.engine)));
    transaction(&mut run, "c", 2, 100);
    states.push((run.writer.end(), snapshot(&run.engine)));
    let batch = run.writer.take_pending().unwrap();
    let mut full = before.clone();
    apply(&mut full, &batch);
    for cut in 0..=batch.data.len() {
        let (disk, e, report) = crash_at(&before, &batch, cut);
        let want = expected(&states, &disk, &full);
        assert_eq!(report.end, want.0, "cut {cut}");
        assert_eq!(snapshot(&e), want.1, "cut {cut}");
        // Each transaction's keys are all there or none.
        for (tag, n) in [("b", 5), ("c", 2)] {
            let present = (0..n)
                .filter(|k| e.peek(format!("{tag}{k}").as_bytes(), 0).is_some())
                .count();
            assert!(
                present == 0 || present == n,
                "cut {cut}: {present} of {tag}"
            );
        }
    }
}

#[test]
fn random_transactions_round_trip_through_the_log() {
    let mut run = Run::new(4096, 0x7777);
    let mut rng = Rng(17);
    for round in 0..300 {
        let in_multi = rng.below(2) == 0;
        if in_multi {
            run.exec(&args(&["MULTI"]));
        }
        for _ in 0..1 + rng.below(6) {
            let cmd = random_write(&mut rng, run.now);
            run.exec(&cmd);
        }
        if in_multi {
            let end = if rng.below(5) == 0 { "DISCARD" } else { "EXEC" };
            run.exec(&args(&[end]));
        }
        if round % 3 == 0 {
            run.flush();
        }
    }
    run.flush();
    run.check_replay();
    assert_eq!(run.engine.log_budget(), Some(run.writer.remaining()));
}
