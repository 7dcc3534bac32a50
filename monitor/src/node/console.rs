//! The machine's console: one device whose output reaches the terminal in the machine's
//! global order.
//!
//! Each node's vCPU writes its UART; the node hands the bytes ([`ConsoleTap`]) to its engine,
//! which carries them in its next batch, so they take their place in the global order with
//! the node's stores. Node 0 prints the bytes of every batch as it applies it
//! ([`ConsoleOut`]), labelling lines by vCPU if asked (like `srun -l`).
#![forbid(unsafe_code)]

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vsmp_coherence::fabric::NodeId;

/// What a vCPU's UART writes, collected for the engine.
#[derive(Debug, Clone, Default)]
pub struct ConsoleTap(Arc<Mutex<Vec<u8>>>);

impl ConsoleTap {
    /// Hands what was written since the last call to `f` (at most one call).
    pub fn drain(&self, f: impl FnOnce(&[u8])) {
        let mut buf = self.0.lock().expect("the console tap is never poisoned");
        if !buf.is_empty() {
            f(&buf);
            buf.clear();
        }
    }
}

impl Write for ConsoleTap {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .expect("the console tap is never poisoned")
            .extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The terminal end of the console (on node 0).
pub struct ConsoleOut {
    out: Box<dyn Write + Send>,
    label: bool,
    /// Per vCPU: whether its next byte starts a line.
    at_line_start: Vec<bool>,
}

impl std::fmt::Debug for ConsoleOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleOut")
            .field("label", &self.label)
            .finish()
    }
}

impl ConsoleOut {
    pub fn new(out: Box<dyn Write + Send>, vcpus: usize, label: bool) -> ConsoleOut {
        ConsoleOut {
            out,
            label,
            at_line_start: vec![true; vcpus],
        }
    }

    /// Prints bytes `from`'s vCPU wrote.
    pub fn write(&mut self, from: NodeId, bytes: &[u8]) -> io::Result<()> {
        if !self.label {
            self.out.write_all(bytes)?;
        } else {
            let start = &mut self.at_line_start[from.index()];
            for line in bytes.split_inclusive(|b| *b == b'\n') {
                if *start {
                    write!(self.out, "{}: ", from.0)?;
                }
                self.out.write_all(line)?;
                *start = line.ends_with(b"\n");
            }
        }
        if bytes.contains(&b'\n') {
            self.out.flush()?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn labels_start_each_line_of_each_vcpu() {
        let s = Shared::default();
        let mut c = ConsoleOut::new(Box::new(s.clone()), 2, true);
        c.write(NodeId(1), b"a").unwrap();
        c.write(NodeId(0), b"x\ny").unwrap();
        c.write(NodeId(1), b"b\n").unwrap();
        let text = String::from_utf8(s.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text, "1: a0: x\n0: yb\n");
    }

    #[test]
    fn a_tap_hands_over_what_was_written_once() {
        let mut t = ConsoleTap::default();
        t.write_all(b"hi").unwrap();
        let mut got = Vec::new();
        t.drain(|b| got.extend_from_slice(b));
        t.drain(|b| got.extend_from_slice(b));
        assert_eq!(got, b"hi");
    }
}
