//! The exit device, after QEMU's `isa-debug-exit`: the guest writes its exit status to
//! [`crate::layout::EXIT_PORT`] and the run ends.
//!
//! Unlike QEMU (which exits with `(value << 1) | 1`), the status is the written value's low
//! byte as is, so a guest's `main` return value becomes `vsmp run`'s exit status unchanged.
//! Any access width is accepted; the port reads as 0.
#![forbid(unsafe_code)]

use super::PortEffect;

/// The exit device. It has no state: the first write ends the run.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExitPort;

impl ExitPort {
    /// A write of `value` (any width): the guest exits with its low byte.
    pub fn write(&mut self, value: u32) -> PortEffect {
        PortEffect::Exit {
            status: value as u8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_status_is_the_low_byte_unchanged() {
        assert_eq!(ExitPort.write(0), PortEffect::Exit { status: 0 });
        assert_eq!(ExitPort.write(0x1ff), PortEffect::Exit { status: 0xff });
    }
}
