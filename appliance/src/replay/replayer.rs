//! The backup's environment: hands the guest exactly what the log says, and
//! checks at every exit, every output and every digest that the guest is
//! where the primary was. The first difference is reported as a divergence
//! with its exit ordinal.
//!
//! Entries come from an [`EntrySource`]: a file, or the log channel. An exit
//! whose inputs span several entries (`more` set on all but the last) is
//! only handed out by a live source once all of them arrived, so it is
//! applied all at once or not at all.

use super::digest::{hex, PageRun};
use super::env::{
    DigestDue, EnvError, Environment, ExitPoint, Gather, Input, LocalRead, Outcome, WaitOutcome,
};
use super::log::{Entry, EntrySource, TxCheck, TxDigest};
use crate::devices::virtio::block::SECTOR_SIZE;
use std::collections::VecDeque;

#[derive(Debug)]
pub struct Replayer<S: EntrySource> {
    source: S,
    ordinal: u64,
    inputs: VecDeque<Input>,
    /// The current exit continues in further entries.
    more: bool,
    /// The output check of the current exit (from its last entry).
    expected_tx: Option<TxCheck>,
    /// Frames this guest sent during the current exit.
    tx: TxDigest,
    last_clock_ns: u64,
    /// Digests compared so far.
    pub digests_checked: u64,
    /// Exits whose output checks were compared.
    pub outputs_checked: u64,
}

impl<S: EntrySource> Replayer<S> {
    pub fn new(source: S) -> Self {
        Replayer {
            source,
            ordinal: 0,
            inputs: VecDeque::new(),
            more: false,
            expected_tx: None,
            tx: TxDigest::default(),
            last_clock_ns: 0,
            digests_checked: 0,
            outputs_checked: 0,
        }
    }

    /// The clock value of the last exit replayed: a backup going live
    /// continues the guest's clock from here.
    pub fn last_clock_ns(&self) -> u64 {
        self.last_clock_ns
    }

    pub fn source_mut(&mut self) -> &mut S {
        &mut self.source
    }

    fn diverged(&self, what: impl Into<String>) -> EnvError {
        EnvError::Diverged {
            ordinal: self.ordinal,
            what: what.into(),
        }
    }

    /// Loads the next entry of the current exit when its inputs run dry.
    fn refill(&mut self) -> Result<(), EnvError> {
        while self.inputs.is_empty() && self.more {
            match self.source.next_entry()? {
                Some(Entry::Inputs {
                    ordinal,
                    inputs,
                    more,
                    tx,
                }) if ordinal == self.ordinal => {
                    self.inputs = inputs.into();
                    self.more = more;
                    self.expected_tx = tx;
                }
                Some(other) => {
                    return Err(self.diverged(format!(
                        "the log's exit {} continues, but the next entry is for exit {}",
                        self.ordinal,
                        other.ordinal()
                    )))
                }
                None => {
                    return Err(EnvError::LogEnded {
                        ordinal: self.ordinal,
                    })
                }
            }
        }
        Ok(())
    }

    fn next_input(&mut self, wanted: &str) -> Result<Input, EnvError> {
        self.refill()?;
        self.inputs.pop_front().ok_or_else(|| {
            self.diverged(format!(
                "guest asked for {wanted}, but the log has no further input at this exit"
            ))
        })
    }
}

fn sectors(offset: u64, len: usize) -> String {
    let first = offset / SECTOR_SIZE;
    let last = (offset + len as u64)
        .div_ceil(SECTOR_SIZE)
        .saturating_sub(1);
    format!(
        "sectors {first}..={last} (bytes {offset}..{})",
        offset + len as u64
    )
}

impl<S: EntrySource> Environment for Replayer<S> {
    fn exit(&mut self, ordinal: u64, point: &ExitPoint) -> Result<u64, EnvError> {
        self.ordinal = ordinal;
        let entry = self
            .source
            .next_entry()?
            .ok_or(EnvError::LogEnded { ordinal })?;
        match entry {
            Entry::Exit {
                ordinal: logged,
                point: logged_point,
                clock_ns,
                inputs,
                more,
                tx,
            } => {
                if logged != ordinal {
                    return Err(self.diverged(format!(
                        "the log's next exit is {logged}, the guest is at exit {ordinal} (an entry is missing or extra)"
                    )));
                }
                if logged_point != *point {
                    return Err(self.diverged(format!(
                        "guest exited at {point}, the primary at {logged_point}"
                    )));
                }
                self.inputs = inputs.into();
                self.more = more;
                self.expected_tx = tx;
                self.tx = TxDigest::default();
                self.last_clock_ns = clock_ns;
                Ok(clock_ns)
            }
            Entry::End {
                ordinal: logged, ..
            } => Err(self.diverged(format!(
                "the primary's machine ended after exit {logged}, but the guest made exit {ordinal} at {point}"
            ))),
            Entry::Digest {
                ordinal: logged, ..
            } => Err(self.diverged(format!(
                "the log has a state digest for exit {logged} where exit {ordinal} was expected"
            ))),
            Entry::Inputs {
                ordinal: logged, ..
            } => Err(self.diverged(format!(
                "the log has more inputs for exit {logged} that the guest did not take before exit {ordinal}"
            ))),
            Entry::Invalid => Err(self.diverged("the log has a reserved entry")),
        }
    }

    fn entropy(&mut self, buf: &mut [u8]) -> Result<(), EnvError> {
        match self.next_input("entropy")? {
            Input::Entropy(bytes) if bytes.len() == buf.len() => {
                buf.copy_from_slice(&bytes);
                Ok(())
            }
            Input::Entropy(bytes) => Err(self.diverged(format!(
                "guest asked for {} entropy bytes, the primary for {}",
                buf.len(),
                bytes.len()
            ))),
            other => Err(self.diverged(format!("guest asked for entropy, the log has {other}"))),
        }
    }

    fn wait(&mut self, _deadline_ns: u64, _gather: Gather) -> Result<WaitOutcome, EnvError> {
        match self.next_input("a wait")? {
            Input::Wake {
                input_arrived,
                now_ns,
            } => Ok(WaitOutcome {
                input_arrived,
                now_ns,
            }),
            other => Err(self.diverged(format!("guest waited, the log has {other}"))),
        }
    }

    fn net_rx(&mut self) -> Result<Option<Vec<u8>>, EnvError> {
        self.refill()?;
        if matches!(self.inputs.front(), Some(Input::NetRx(_))) {
            if let Some(Input::NetRx(frame)) = self.inputs.pop_front() {
                return Ok(Some(frame));
            }
        }
        Ok(None)
    }

    fn net_tx(&mut self, frame: &[u8]) -> Result<(), EnvError> {
        // The backup is silent: its guest's output was already sent by the
        // primary. It is checked against the primary's at exit_done.
        self.tx.add(frame);
        Ok(())
    }

    fn disk_read(
        &mut self,
        offset: u64,
        buf: &mut [u8],
        local: LocalRead<'_>,
    ) -> Result<(), EnvError> {
        match self.next_input("disk read data")? {
            Input::DiskRead(bytes) if bytes.len() == buf.len() => {
                buf.copy_from_slice(&bytes);
                Ok(())
            }
            Input::DiskReadHash { len, hash } if len as usize == buf.len() => {
                local(buf).map_err(EnvError::DiskRead)?;
                let ours = blake3::hash(buf);
                if *ours.as_bytes() != hash {
                    return Err(self.diverged(format!(
                        "disk read of {}: this disk's data differs from the primary's (primary {}, backup {})",
                        sectors(offset, buf.len()),
                        &blake3::Hash::from(hash).to_hex()[..16],
                        &ours.to_hex()[..16]
                    )));
                }
                Ok(())
            }
            Input::DiskRead(bytes) => Err(self.diverged(format!(
                "guest read {} disk bytes, the primary's guest {}",
                buf.len(),
                bytes.len()
            ))),
            Input::DiskReadHash { len, .. } => Err(self.diverged(format!(
                "guest read {} disk bytes, the primary's guest {len}",
                buf.len()
            ))),
            other => Err(self.diverged(format!("guest read the disk, the log has {other}"))),
        }
    }

    fn exit_done(&mut self) -> Result<(), EnvError> {
        self.refill()?;
        if let Some(left) = self.inputs.front() {
            return Err(self.diverged(format!(
                "the primary's guest consumed input ({left}) at this exit, this guest did not"
            )));
        }
        let ours = self.tx.take();
        if ours != self.expected_tx {
            let describe = |t: &Option<TxCheck>| match t {
                None => "no frame".to_string(),
                Some(t) => format!("{} frame(s), digest {}", t.frames, &hex(&t.digest)[..16]),
            };
            return Err(self.diverged(format!(
                "the guest's network output differs: primary sent {}, backup {}",
                describe(&self.expected_tx),
                describe(&ours)
            )));
        }
        if ours.is_some() {
            self.outputs_checked += 1;
        }
        Ok(())
    }

    fn digest_due(&mut self, ordinal: u64) -> Result<Option<DigestDue>, EnvError> {
        match self.source.peek_entry()? {
            Some(Entry::Digest {
                ordinal: logged,
                full,
                pages,
                ..
            }) if *logged == ordinal => Ok(Some(if *full {
                DigestDue::Full
            } else {
                DigestDue::Pages(pages.clone())
            })),
            _ => Ok(None),
        }
    }

    fn digest_taken(
        &mut self,
        ordinal: u64,
        full: bool,
        _pages: &[PageRun],
        hash: [u8; 32],
    ) -> Result<(), EnvError> {
        let Some(Entry::Digest {
            hash: logged,
            pages,
            ..
        }) = self.source.next_entry()?
        else {
            return Err(self.diverged("state digest entry vanished from the log"));
        };
        self.digests_checked += 1;
        if logged != hash {
            let scope = if full {
                "all of memory".to_string()
            } else {
                format!(
                    "{} dirtied pages",
                    pages.iter().fold(0u64, |a, r| a.saturating_add(r.count))
                )
            };
            return Err(EnvError::Diverged {
                ordinal,
                what: format!(
                    "state digest over registers and {scope} differs (primary {}, backup {})",
                    &hex(&logged)[..16],
                    &hex(&hash)[..16]
                ),
            });
        }
        Ok(())
    }

    fn stopped_at(&mut self, ordinal: u64) -> Result<bool, EnvError> {
        Ok(matches!(
            self.source.peek_entry()?,
            Some(Entry::End { ordinal: o, outcome: Outcome::Stopped, .. }) if *o == ordinal
        ))
    }

    fn finish(
        &mut self,
        ordinal: u64,
        outcome: &Outcome,
        digest: [u8; 32],
    ) -> Result<(), EnvError> {
        self.ordinal = ordinal;
        match self.source.next_entry()? {
            None => Err(EnvError::LogEnded { ordinal }),
            Some(Entry::End {
                ordinal: logged,
                outcome: logged_outcome,
                digest: logged_digest,
            }) => {
                if logged != ordinal {
                    return Err(self.diverged(format!(
                        "guest ended after exit {ordinal}, the primary's after exit {logged}"
                    )));
                }
                if logged_outcome != *outcome {
                    return Err(self.diverged(format!(
                        "guest ended with '{outcome}', the primary's with '{logged_outcome}'"
                    )));
                }
                if logged_digest != digest {
                    return Err(self.diverged(format!(
                        "final state digest differs (primary {}, backup {})",
                        hex(&logged_digest),
                        hex(&digest)
                    )));
                }
                Ok(())
            }
            Some(other) => Err(self.diverged(format!(
                "guest ended ({outcome}) but the log continues with an entry for exit {}",
                other.ordinal()
            ))),
        }
    }
}
