//! The console: COM1, a 16550 UART reduced to what `docs/guest-platform.md` ("I/O ports")
//! defines. Offsets from the base port:
//!
//! | off | register | read | write |
//! |-----|----------|------|-------|
//! | 0 | THR/RBR | 0 (no input) | the byte goes to the console |
//! | 1 | IER | 0 | ignored |
//! | 2 | IIR/FCR | 0x01 (no interrupt pending) | ignored |
//! | 3 | LCR | 0 | ignored |
//! | 4 | MCR | 0 | ignored |
//! | 5 | LSR | 0x60 (THR empty, transmitter empty, no data ready) | ignored |
//! | 6 | MSR | 0 | ignored |
//! | 7 | SCR | 0 | ignored |
//!
//! There is no divisor latch: with LCR ignored, a write to offset 0 always transmits.
//! Transmission is instantaneous (LSR always says the transmitter is empty) and raises no
//! interrupt. Transmitted bytes are collected in a fixed buffer of [`CONSOLE_LINE_BYTES`] and
//! written to the console writer at each `\n`, when the buffer is full, on [`Uart::flush`],
//! and when the UART is dropped, so the trap path does not make a system call per byte and
//! never allocates.
#![forbid(unsafe_code)]

use std::fmt;
use std::io;

use super::DeviceError;

/// Number of consecutive ports the UART occupies.
pub const UART_PORTS: u16 = 8;

/// Bytes of console output buffered before they must be written out: one generous line.
pub const CONSOLE_LINE_BYTES: usize = 256;

/// Offset of the transmit holding register.
const THR: u16 = 0;
/// Offset of the interrupt identification register.
const IIR: u16 = 2;
/// Offset of the line status register.
const LSR: u16 = 5;

/// IIR: no interrupt pending.
pub const IIR_NO_INTERRUPT: u8 = 0x01;
/// LSR: transmit holding register empty (bit 5) and transmitter empty (bit 6).
pub const LSR_IDLE: u8 = 0x60;

/// The console UART: only its output buffer has state.
pub struct Uart {
    line: [u8; CONSOLE_LINE_BYTES],
    line_len: usize,
    console: Box<dyn io::Write + Send>,
}

impl fmt::Debug for Uart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Uart")
            .field("buffered_bytes", &self.line_len)
            .finish_non_exhaustive()
    }
}

impl Uart {
    /// A UART whose output goes to `console`.
    pub fn new(console: Box<dyn io::Write + Send>) -> Uart {
        Uart {
            line: [0; CONSOLE_LINE_BYTES],
            line_len: 0,
            console,
        }
    }

    /// Reads the register at `offset` (0..8) from the base port.
    pub fn read(&mut self, offset: u16) -> u8 {
        match offset {
            IIR => IIR_NO_INTERRUPT,
            LSR => LSR_IDLE,
            _ => 0,
        }
    }

    /// Writes `byte` to the register at `offset` (0..8) from the base port.
    pub fn write(&mut self, offset: u16, byte: u8) -> Result<(), DeviceError> {
        if offset == THR {
            self.transmit(byte)?;
        }
        Ok(())
    }

    fn transmit(&mut self, byte: u8) -> Result<(), DeviceError> {
        self.line[self.line_len] = byte;
        self.line_len += 1;
        if byte == b'\n' || self.line_len == CONSOLE_LINE_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the buffered output to the console and flushes it.
    pub fn flush(&mut self) -> Result<(), DeviceError> {
        let len = std::mem::take(&mut self.line_len);
        self.console
            .write_all(&self.line[..len])
            .map_err(DeviceError::WriteConsole)?;
        self.console.flush().map_err(DeviceError::WriteConsole)
    }
}

impl Drop for Uart {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(error = %e, "guest console output lost at shutdown");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::tests::SharedConsole;

    #[test]
    fn the_registers_read_as_the_guest_platform_says() {
        let mut uart = Uart::new(Box::new(io::sink()));
        let read: Vec<u8> = (0..UART_PORTS).map(|off| uart.read(off)).collect();
        assert_eq!(read, [0, 0, 0x01, 0, 0, 0x60, 0, 0]);
    }

    #[test]
    fn writes_to_registers_other_than_thr_are_ignored() {
        let console = SharedConsole::default();
        let mut uart = Uart::new(Box::new(console.clone()));
        for off in 1..UART_PORTS {
            uart.write(off, 0x83).unwrap();
        }
        assert_eq!(uart.read(7), 0, "the scratch register does not keep writes");
        assert_eq!(uart.read(3), 0);
        uart.write(0, b'x').unwrap();
        uart.flush().unwrap();
        assert_eq!(
            console.text(),
            "x",
            "no divisor latch: offset 0 always transmits"
        );
    }

    #[test]
    fn a_full_buffer_is_written_out_without_a_newline() {
        let console = SharedConsole::default();
        let mut uart = Uart::new(Box::new(console.clone()));
        for _ in 0..CONSOLE_LINE_BYTES {
            uart.write(0, b'x').unwrap();
        }
        assert_eq!(console.text().len(), CONSOLE_LINE_BYTES);
    }

    #[test]
    fn dropping_the_uart_writes_out_a_partial_line() {
        let console = SharedConsole::default();
        let mut uart = Uart::new(Box::new(console.clone()));
        uart.write(0, b'a').unwrap();
        drop(uart);
        assert_eq!(console.text(), "a");
    }

    #[derive(Debug)]
    struct BrokenConsole;

    impl io::Write for BrokenConsole {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::new(io::ErrorKind::BrokenPipe, "closed"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_console_that_fails_is_reported_at_the_newline() {
        let mut uart = Uart::new(Box::new(BrokenConsole));
        uart.write(0, b'a').unwrap();
        let err = uart.write(0, b'\n').unwrap_err();
        assert!(err.to_string().contains("console"), "{err}");
    }
}
