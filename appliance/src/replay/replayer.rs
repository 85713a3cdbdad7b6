//! The backup's environment: hands the guest exactly what the log says, and
//! checks at every exit and every digest that the guest is where the primary
//! was. The first difference is reported as a divergence with its exit ordinal.

use super::digest::{hex, PageRun};
use super::env::{
    DigestDue, EnvError, Environment, ExitPoint, Input, LocalRead, Outcome, WaitOutcome,
};
use super::log::{Entry, LogReader};
use std::collections::VecDeque;
use std::io::Read;

#[derive(Debug)]
pub struct Replayer<R: Read> {
    log: LogReader<R>,
    ordinal: u64,
    inputs: VecDeque<Input>,
    /// Digests compared so far.
    pub digests_checked: u64,
}

impl<R: Read> Replayer<R> {
    pub fn new(log: LogReader<R>) -> Self {
        Replayer {
            log,
            ordinal: 0,
            inputs: VecDeque::new(),
            digests_checked: 0,
        }
    }

    fn diverged(&self, what: impl Into<String>) -> EnvError {
        EnvError::Diverged {
            ordinal: self.ordinal,
            what: what.into(),
        }
    }

    /// Loads continuation inputs of the current exit when the queue runs dry.
    fn refill(&mut self) -> Result<(), EnvError> {
        if self.inputs.is_empty() {
            if let Some(Entry::Inputs { ordinal, .. }) = self.log.peek_entry()? {
                if *ordinal == self.ordinal {
                    if let Some(Entry::Inputs { inputs, .. }) = self.log.next_entry()? {
                        self.inputs = inputs.into();
                    }
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

impl<R: Read> Environment for Replayer<R> {
    fn exit(&mut self, ordinal: u64, point: &ExitPoint) -> Result<u64, EnvError> {
        self.ordinal = ordinal;
        let entry = self
            .log
            .next_entry()?
            .ok_or(EnvError::LogEnded { ordinal })?;
        match entry {
            Entry::Exit {
                ordinal: logged,
                point: logged_point,
                clock_ns,
                inputs,
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

    fn wait(&mut self, _deadline_ns: u64) -> Result<WaitOutcome, EnvError> {
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

    fn net_tx(&mut self, _frame: &[u8]) -> Result<(), EnvError> {
        // The backup is silent: its guest's output was already sent by the primary.
        Ok(())
    }

    fn disk_read(&mut self, buf: &mut [u8], _local: LocalRead<'_>) -> Result<(), EnvError> {
        match self.next_input("disk read data")? {
            Input::DiskRead(bytes) if bytes.len() == buf.len() => {
                buf.copy_from_slice(&bytes);
                Ok(())
            }
            Input::DiskRead(bytes) => Err(self.diverged(format!(
                "guest read {} disk bytes, the primary's guest {}",
                buf.len(),
                bytes.len()
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
        Ok(())
    }

    fn digest_due(&mut self, ordinal: u64) -> Result<Option<DigestDue>, EnvError> {
        match self.log.peek_entry()? {
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
        }) = self.log.next_entry()?
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
            self.log.peek_entry()?,
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
        match self.log.next_entry()? {
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
