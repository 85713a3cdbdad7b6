//! The primary's environment: the live world, with every input appended to
//! the log against the exit ordinal at which it was handed in. The log goes
//! to a [`LogSink`]: a file for `ftvm record`, the log channel on a primary.

use super::digest::PageRun;
use super::env::{
    DigestDue, EnvError, Environment, ExitPoint, Gather, Input, LocalRead, Outcome, WaitOutcome,
};
use super::live::LiveWorld;
use super::log::{DiskReads, Entry, LogSink, TxDigest, INPUT_BYTES_PER_ENTRY};

/// When state digests are taken.
#[derive(Debug, Clone, Copy)]
pub struct DigestSchedule {
    /// Exits between digests.
    pub interval: u64,
    /// Every this many digests, a full-memory digest.
    pub full_every: u64,
}

impl DigestSchedule {
    pub fn due(&self, ordinal: u64) -> Option<DigestDue> {
        if ordinal == 0 || !ordinal.is_multiple_of(self.interval) {
            return None;
        }
        if (ordinal / self.interval).is_multiple_of(self.full_every) {
            Some(DigestDue::Full)
        } else {
            Some(DigestDue::OwnDirtyPages)
        }
    }
}

#[derive(Debug)]
pub struct Recorder<S: LogSink> {
    live: LiveWorld,
    log: S,
    schedule: DigestSchedule,
    disk_reads: DiskReads,
    /// The current exit's entry (an `Exit`, or its `Inputs` continuation).
    pending: Option<Entry>,
    pending_bytes: usize,
    /// Frames the guest sent during the current exit.
    tx: TxDigest,
}

impl<S: LogSink> Recorder<S> {
    pub fn new(live: LiveWorld, log: S, schedule: DigestSchedule, disk_reads: DiskReads) -> Self {
        Recorder {
            live,
            log,
            schedule,
            disk_reads,
            pending: None,
            pending_bytes: 0,
            tx: TxDigest::default(),
        }
    }

    /// Adds an input to the current exit's entry; a large exit continues in
    /// `Inputs` entries so every entry fits one frame.
    fn push_input(&mut self, input: Input) -> Result<(), EnvError> {
        let size = input.payload_len();
        if self.pending_bytes > 0 && self.pending_bytes + size > INPUT_BYTES_PER_ENTRY {
            if let Some(mut full) = self.pending.take() {
                let ordinal = full.ordinal();
                if let Entry::Exit { more, .. } | Entry::Inputs { more, .. } = &mut full {
                    *more = true;
                }
                self.log.append(&full)?;
                self.pending = Some(Entry::Inputs {
                    ordinal,
                    inputs: Vec::new(),
                    more: false,
                    tx: None,
                });
                self.pending_bytes = 0;
            }
        }
        if let Some(Entry::Exit { inputs, .. } | Entry::Inputs { inputs, .. }) = &mut self.pending {
            inputs.push(input);
            self.pending_bytes += size;
        }
        Ok(())
    }

    /// Log bytes and entries written so far.
    pub fn log_stats(&self) -> (u64, u64) {
        self.log.stats()
    }

    pub fn live_mut(&mut self) -> &mut LiveWorld {
        &mut self.live
    }

    pub fn into_parts(self) -> (LiveWorld, S) {
        (self.live, self.log)
    }
}

impl<S: LogSink> Environment for Recorder<S> {
    fn exit(&mut self, ordinal: u64, point: &ExitPoint) -> Result<u64, EnvError> {
        let clock_ns = self.live.now_ns();
        self.pending = Some(Entry::Exit {
            ordinal,
            point: *point,
            clock_ns,
            inputs: Vec::new(),
            more: false,
            tx: None,
        });
        self.pending_bytes = 0;
        Ok(clock_ns)
    }

    fn entropy(&mut self, buf: &mut [u8]) -> Result<(), EnvError> {
        self.live.fill_entropy(buf)?;
        self.push_input(Input::Entropy(buf.to_vec()))?;
        Ok(())
    }

    fn wait(&mut self, deadline_ns: u64, gather: Gather) -> Result<WaitOutcome, EnvError> {
        let out = self.live.wait_until(deadline_ns, gather);
        self.push_input(Input::Wake {
            input_arrived: out.input_arrived,
            now_ns: out.now_ns,
        })?;
        Ok(out)
    }

    fn net_rx(&mut self) -> Result<Option<Vec<u8>>, EnvError> {
        let frame = self.live.receive_frame();
        if let Some(f) = &frame {
            self.push_input(Input::NetRx(f.clone()))?;
        }
        Ok(frame)
    }

    /// The frame was computed from guest state that every entry appended so
    /// far determines (the current exit's own entry is not needed: a backup
    /// that goes live at this exit sends the same frame again). So it
    /// depends on the last appended index, and those entries leave now.
    fn net_tx(&mut self, frame: &[u8]) -> Result<(), EnvError> {
        self.tx.add(frame);
        self.log.flush_for_output()?;
        self.live.send_frame(frame, self.log.last_index());
        Ok(())
    }

    fn disk_read(
        &mut self,
        _offset: u64,
        buf: &mut [u8],
        local: LocalRead<'_>,
    ) -> Result<(), EnvError> {
        LiveWorld::read_local(buf, local)?;
        let input = match self.disk_reads {
            DiskReads::Ship => Input::DiskRead(buf.to_vec()),
            DiskReads::BackupReads => Input::DiskReadHash {
                len: buf.len() as u32,
                hash: *blake3::hash(buf).as_bytes(),
            },
        };
        self.push_input(input)
    }

    fn exit_done(&mut self) -> Result<(), EnvError> {
        if let Some(mut e) = self.pending.take() {
            if let Entry::Exit { tx, .. } | Entry::Inputs { tx, .. } = &mut e {
                *tx = self.tx.take();
            }
            self.log.append(&e)?;
        }
        Ok(())
    }

    fn digest_due(&mut self, ordinal: u64) -> Result<Option<DigestDue>, EnvError> {
        Ok(self.schedule.due(ordinal))
    }

    fn digest_taken(
        &mut self,
        ordinal: u64,
        full: bool,
        pages: &[PageRun],
        hash: [u8; 32],
    ) -> Result<(), EnvError> {
        self.log.append(&Entry::Digest {
            ordinal,
            full,
            pages: pages.to_vec(),
            hash,
        })?;
        Ok(())
    }

    fn finish(
        &mut self,
        ordinal: u64,
        outcome: &Outcome,
        digest: [u8; 32],
    ) -> Result<(), EnvError> {
        self.exit_done()?;
        self.log.append(&Entry::End {
            ordinal,
            outcome: outcome.clone(),
            digest,
        })?;
        self.log.flush()?;
        Ok(())
    }
}
