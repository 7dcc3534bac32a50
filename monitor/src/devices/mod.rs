//! The node's emulated devices and the port-I/O bus that reaches them.
//!
//! The guest does port I/O with real `in`/`out`/`ins`/`outs` instructions; the emulator
//! ([`crate::emulate::port`]) decodes them and calls [`PortBus::read`] / [`PortBus::write`].
//! Only the monitor thread touches the bus.
//!
//! Dispatch follows `docs/guest-platform.md` ("I/O ports"): an access of any width (byte,
//! word, dword) goes to the device at the port it names; a device register is 8 bits wide, so
//! a wider write delivers its low byte and a wider read returns the register zero-extended:
//! - COM1, [`layout::COM1_PORT`]`..+8`: the console UART ([`uart`]);
//! - [`layout::EXIT_PORT`]: the exit device ([`exit`]); it reads as 0;
//! - [`layout::DONE_PORT`]: the vCPU-done device (a return from `main`); it reads as 0;
//! - any other port reads as all-ones of the access width (like an empty PC bus) and ignores
//!   writes. Both are logged at `debug` level (an unclaimed port is normal PC behaviour: Linux
//!   writes port 0x80 as an I/O delay), rate-limited to [`UNKNOWN_PORT_LOG_LIMIT`] messages
//!   per direction, since a guest can trigger them at will.
#![forbid(unsafe_code)]

pub mod exit;
pub mod uart;

use std::io;

use crate::layout;
use exit::ExitPort;
use uart::Uart;

/// How many unknown-port accesses are logged per direction before the rest are silenced: a
/// guest probing ports in a loop must not flood the log.
pub const UNKNOWN_PORT_LOG_LIMIT: u32 = 8;

/// Width of a port access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortSize {
    Byte = 1,
    Word = 2,
    Dword = 4,
}

impl PortSize {
    /// Width in bytes.
    pub const fn bytes(self) -> u16 {
        self as u16
    }

    /// The value with all bits of this width set.
    pub const fn mask(self) -> u32 {
        match self {
            PortSize::Byte => 0xff,
            PortSize::Word => 0xffff,
            PortSize::Dword => 0xffff_ffff,
        }
    }
}

/// What a port write did beyond changing device state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortEffect {
    /// Nothing the run loop must act on.
    None,
    /// The guest wrote its exit status to the exit port: the machine stops.
    Exit { status: u8 },
    /// This vCPU's `main` returned `status` (the vCPU-done port): this vCPU stops.
    Done { status: u8 },
}

/// A device failed to complete a port access.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The console writer refused the UART's output.
    #[error("writing the guest console output failed")]
    WriteConsole(#[source] io::Error),
}

/// The port-I/O bus: dispatches each access by port to the device that claims it.
#[derive(Debug)]
pub struct PortBus {
    uart: Uart,
    exit: ExitPort,
    unknown_reads_logged: u32,
    unknown_writes_logged: u32,
}

const COM1_END: u16 = layout::COM1_PORT + uart::UART_PORTS;

impl PortBus {
    /// A bus with the console UART writing to `console`, and the exit device.
    pub fn new(console: Box<dyn io::Write + Send>) -> PortBus {
        PortBus {
            uart: Uart::new(console),
            exit: ExitPort,
            unknown_reads_logged: 0,
            unknown_writes_logged: 0,
        }
    }

    /// Reads `size` bytes at `port`; the result is zero-extended.
    pub fn read(&mut self, port: u16, size: PortSize) -> u32 {
        match port {
            layout::COM1_PORT..COM1_END => self.uart.read(port - layout::COM1_PORT).into(),
            layout::EXIT_PORT | layout::DONE_PORT => 0,
            _ => {
                if self.unknown_reads_logged < UNKNOWN_PORT_LOG_LIMIT {
                    self.unknown_reads_logged += 1;
                    tracing::debug!(
                        port = format_args!("{port:#x}"),
                        "guest read an unknown i/o port; it reads as all ones"
                    );
                    if self.unknown_reads_logged == UNKNOWN_PORT_LOG_LIMIT {
                        tracing::debug!("further reads of unknown i/o ports are not logged");
                    }
                }
                size.mask()
            }
        }
    }

    /// Writes the low `size` bytes of `value` at `port`.
    pub fn write(
        &mut self,
        port: u16,
        size: PortSize,
        value: u32,
    ) -> Result<PortEffect, DeviceError> {
        let value = value & size.mask();
        match port {
            layout::COM1_PORT..COM1_END => {
                self.uart.write(port - layout::COM1_PORT, value as u8)?;
                Ok(PortEffect::None)
            }
            layout::EXIT_PORT => Ok(self.exit.write(value)),
            layout::DONE_PORT => Ok(PortEffect::Done {
                status: value as u8,
            }),
            _ => {
                if self.unknown_writes_logged < UNKNOWN_PORT_LOG_LIMIT {
                    self.unknown_writes_logged += 1;
                    tracing::debug!(
                        port = format_args!("{port:#x}"),
                        value = format_args!("{value:#x}"),
                        "guest wrote an unknown i/o port; the write is ignored"
                    );
                    if self.unknown_writes_logged == UNKNOWN_PORT_LOG_LIMIT {
                        tracing::debug!("further writes to unknown i/o ports are not logged");
                    }
                }
                Ok(PortEffect::None)
            }
        }
    }

    /// Writes out any console output still buffered (the UART buffers up to a line).
    pub fn flush(&mut self) -> Result<(), DeviceError> {
        self.uart.flush()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A console writer whose output the test can read.
    #[derive(Debug, Clone, Default)]
    pub(crate) struct SharedConsole(pub Arc<Mutex<Vec<u8>>>);

    impl io::Write for SharedConsole {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl SharedConsole {
        pub(crate) fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    #[test]
    fn an_unknown_port_reads_as_all_ones_of_the_access_width() {
        let mut bus = PortBus::new(Box::new(io::sink()));
        assert_eq!(bus.read(0x80, PortSize::Byte), 0xff);
        assert_eq!(bus.read(0x80, PortSize::Word), 0xffff);
        assert_eq!(bus.read(0x80, PortSize::Dword), 0xffff_ffff);
    }

    #[test]
    fn a_write_to_an_unknown_port_is_ignored() {
        let mut bus = PortBus::new(Box::new(io::sink()));
        for _ in 0..2 * UNKNOWN_PORT_LOG_LIMIT {
            assert_eq!(
                bus.write(0x80, PortSize::Byte, 1).unwrap(),
                PortEffect::None
            );
        }
    }

    #[test]
    fn a_dword_write_to_the_exit_port_exits_with_its_low_byte() {
        let mut bus = PortBus::new(Box::new(io::sink()));
        let effect = bus
            .write(layout::EXIT_PORT, PortSize::Dword, 0x1234_5603)
            .unwrap();
        assert_eq!(effect, PortEffect::Exit { status: 3 });
    }

    #[test]
    fn a_word_write_to_the_uart_data_port_sends_its_low_byte() {
        let console = SharedConsole::default();
        let mut bus = PortBus::new(Box::new(console.clone()));
        bus.write(layout::COM1_PORT, PortSize::Word, 0x0a41)
            .unwrap();
        bus.write(layout::COM1_PORT, PortSize::Dword, 0x1234_560a)
            .unwrap();
        assert_eq!(console.text(), "A\n");
    }

    #[test]
    fn the_exit_port_reads_as_zero() {
        let mut bus = PortBus::new(Box::new(io::sink()));
        assert_eq!(bus.read(layout::EXIT_PORT, PortSize::Byte), 0);
        assert_eq!(bus.read(layout::EXIT_PORT, PortSize::Dword), 0);
    }

    #[test]
    fn a_wide_read_of_a_uart_register_is_zero_extended() {
        let mut bus = PortBus::new(Box::new(io::sink()));
        assert_eq!(bus.read(layout::COM1_PORT + 5, PortSize::Dword), 0x60);
    }

    #[test]
    fn bytes_written_to_the_uart_reach_the_console_at_the_newline() {
        let console = SharedConsole::default();
        let mut bus = PortBus::new(Box::new(console.clone()));
        for &b in b"hi" {
            bus.write(layout::COM1_PORT, PortSize::Byte, b.into())
                .unwrap();
        }
        assert_eq!(console.text(), "");
        bus.write(layout::COM1_PORT, PortSize::Byte, b'\n'.into())
            .unwrap();
        assert_eq!(console.text(), "hi\n");
    }
}
