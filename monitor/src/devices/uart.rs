//! The console: a 16550 UART (COM1), transmit only.
//!
//! Register behaviour (offsets from the base port; DLAB is bit 7 of LCR):
//!
//! | off | read                              | write                                  |
//! |-----|-----------------------------------|----------------------------------------|
//! | 0   | RBR: 0 (no input) / DLL if DLAB   | THR: byte to the console / DLL if DLAB |
//! | 1   | IER / DLM if DLAB                 | IER (low 4 bits) / DLM if DLAB         |
//! | 2   | IIR: 0x01 (no interrupt pending), 0xc1 with FIFOs enabled | FCR (stored) |
//! | 3   | LCR                               | LCR                                    |
//! | 4   | MCR                               | MCR (low 5 bits)                       |
//! | 5   | LSR: 0x60 (THR empty, transmitter empty, no data ready) | ignored       |
//! | 6   | MSR: 0                            | ignored                                |
//! | 7   | SCR (scratch, reads back)         | SCR                                    |
//!
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

/// Line status: transmit holding register empty (bit 5) and transmitter empty (bit 6).
pub const LSR_IDLE: u8 = 0x60;

const LCR_DLAB: u8 = 0x80;
const FCR_FIFO_ENABLE: u8 = 0x01;
const IIR_NO_INTERRUPT: u8 = 0x01;
const IIR_FIFOS_ENABLED: u8 = 0xc0;

/// The 16550's registers and the console output buffer.
pub struct Uart {
    ier: u8,
    fcr: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    line: [u8; CONSOLE_LINE_BYTES],
    line_len: usize,
    console: Box<dyn io::Write + Send>,
}

impl fmt::Debug for Uart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Uart")
            .field("ier", &self.ier)
            .field("fcr", &self.fcr)
            .field("lcr", &self.lcr)
            .field("mcr", &self.mcr)
            .field("scr", &self.scr)
            .field("divisor", &u16::from_le_bytes([self.dll, self.dlm]))
            .field("buffered_bytes", &self.line_len)
            .finish_non_exhaustive()
    }
}

impl Uart {
    /// A UART in its reset state (divisor 12, 9600 baud, which nothing depends on).
    pub fn new(console: Box<dyn io::Write + Send>) -> Uart {
        Uart {
            ier: 0,
            fcr: 0,
            lcr: 0,
            mcr: 0,
            scr: 0,
            dll: 12,
            dlm: 0,
            line: [0; CONSOLE_LINE_BYTES],
            line_len: 0,
            console,
        }
    }

    fn dlab(&self) -> bool {
        self.lcr & LCR_DLAB != 0
    }

    /// Reads the register at `offset` (0..8) from the base port.
    pub fn read(&mut self, offset: u16) -> u8 {
        match offset {
            0 if self.dlab() => self.dll,
            0 => 0,
            1 if self.dlab() => self.dlm,
            1 => self.ier,
            2 if self.fcr & FCR_FIFO_ENABLE != 0 => IIR_NO_INTERRUPT | IIR_FIFOS_ENABLED,
            2 => IIR_NO_INTERRUPT,
            3 => self.lcr,
            4 => self.mcr,
            5 => LSR_IDLE,
            7 => self.scr,
            _ => 0,
        }
    }

    /// Writes `byte` to the register at `offset` (0..8) from the base port.
    pub fn write(&mut self, offset: u16, byte: u8) -> Result<(), DeviceError> {
        match offset {
            0 if self.dlab() => self.dll = byte,
            0 => return self.transmit(byte),
            1 if self.dlab() => self.dlm = byte,
            1 => self.ier = byte & 0x0f,
            2 => self.fcr = byte,
            3 => self.lcr = byte,
            4 => self.mcr = byte & 0x1f,
            7 => self.scr = byte,
            _ => {}
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
    fn the_line_status_register_always_reports_an_idle_transmitter() {
        let mut uart = Uart::new(Box::new(io::sink()));
        assert_eq!(uart.read(5), 0x60);
    }

    #[test]
    fn the_scratch_register_reads_back_what_was_written() {
        let mut uart = Uart::new(Box::new(io::sink()));
        uart.write(7, 0x5a).unwrap();
        assert_eq!(uart.read(7), 0x5a);
    }

    #[test]
    fn with_dlab_set_offsets_0_and_1_are_the_divisor_latch() {
        let mut uart = Uart::new(Box::new(io::sink()));
        uart.write(3, 0x83).unwrap();
        uart.write(0, 0x01).unwrap();
        uart.write(1, 0x00).unwrap();
        assert_eq!((uart.read(0), uart.read(1)), (0x01, 0x00));
        uart.write(3, 0x03).unwrap();
        uart.write(1, 0x0f).unwrap();
        assert_eq!((uart.read(1), uart.read(3)), (0x0f, 0x03));
    }

    #[test]
    fn iir_says_no_interrupt_pending_and_shows_enabled_fifos() {
        let mut uart = Uart::new(Box::new(io::sink()));
        assert_eq!(uart.read(2), 0x01);
        uart.write(2, 0x07).unwrap();
        assert_eq!(uart.read(2), 0xc1);
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
}
