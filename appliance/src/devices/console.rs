//! Where guest console output goes. Console output is an output, not an
//! input: it is never recorded, and a backup's console is normally silent.

use ftvm_config::appliance::ConsoleOutput;
use std::io::Write;
use std::sync::{Arc, Mutex};

#[derive(Debug)]
enum Sink {
    Stdout,
    Log(Vec<u8>),
    None,
    File(std::fs::File),
}

/// A cloneable handle to the console sink.
#[derive(Debug, Clone)]
pub struct Console {
    sink: Arc<Mutex<Sink>>,
}

impl Console {
    pub fn open(output: &ConsoleOutput) -> std::io::Result<Self> {
        let sink = match output {
            ConsoleOutput::Stdout => Sink::Stdout,
            ConsoleOutput::Log => Sink::Log(Vec::new()),
            ConsoleOutput::None => Sink::None,
            ConsoleOutput::File(p) => Sink::File(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
        };
        Ok(Console {
            sink: Arc::new(Mutex::new(sink)),
        })
    }

    pub fn none() -> Self {
        Console {
            sink: Arc::new(Mutex::new(Sink::None)),
        }
    }

    pub fn write_bytes(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *sink {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Sink::File(f) => f.write_all(bytes),
            Sink::None => Ok(()),
            Sink::Log(line) => {
                for &b in bytes {
                    if b == b'\n' {
                        tracing::info!(target: "guest", "{}", String::from_utf8_lossy(line));
                        line.clear();
                    } else if line.len() < 4096 {
                        line.push(b);
                    }
                }
                Ok(())
            }
        }
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_bytes(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
