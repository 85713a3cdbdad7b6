//! COM1, output only: a 16550 from vm-superio with no interrupt line (there
//! is no irqchip; the guest polls the line status register).

use super::console::Console;
use super::{DeviceAction, DeviceError, ExitContext, PioDevice};
use vm_superio::{Serial, Trigger};

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_LEN: u16 = 8;

/// The serial line's interrupt goes nowhere: no irqchip exists.
#[derive(Debug)]
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

pub struct Com1 {
    serial: Serial<NoInterrupt, vm_superio::serial::NoEvents, Console>,
}

impl std::fmt::Debug for Com1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Com1")
    }
}

impl Com1 {
    pub fn new(console: Console) -> Self {
        Com1 {
            serial: Serial::new(NoInterrupt, console),
        }
    }
}

impl PioDevice for Com1 {
    fn save_state(&self) -> super::persist::PioState {
        super::persist::PioState::Serial((&self.serial.state()).into())
    }

    fn restore_state(
        &mut self,
        state: &super::persist::PioState,
    ) -> Result<(), crate::persist::PersistError> {
        let super::persist::PioState::Serial(s) = state else {
            return Err(crate::persist::PersistError::Device(format!(
                "COM1 cannot take {state:?}"
            )));
        };
        let console = self.serial.writer().clone();
        self.serial = Serial::from_state(
            &s.into(),
            NoInterrupt,
            vm_superio::serial::NoEvents,
            console,
        )
        .map_err(|e| crate::persist::PersistError::Device(format!("COM1: {e:?}")))?;
        Ok(())
    }

    fn pio_read(
        &mut self,
        _ctx: &mut ExitContext<'_>,
        offset: u16,
        data: &mut [u8],
    ) -> Result<DeviceAction, DeviceError> {
        if let Some(b) = data.first_mut() {
            *b = self.serial.read(offset as u8);
        }
        Ok(DeviceAction::Continue)
    }

    fn pio_write(
        &mut self,
        _ctx: &mut ExitContext<'_>,
        offset: u16,
        data: &[u8],
    ) -> Result<DeviceAction, DeviceError> {
        if let Some(&b) = data.first() {
            self.serial
                .write(offset as u8, b)
                .map_err(|e| DeviceError::Console(std::io::Error::other(format!("{e:?}"))))?;
        }
        Ok(DeviceAction::Continue)
    }
}
