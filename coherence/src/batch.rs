//! The batch: what a node publishes at once, in one place of the global order.
//!
//! A batch is a program-order prefix of the node's effects since its last batch: the diffs of
//! every page it dirtied, the pages it hands to a new owner, the bytes it wrote to the console,
//! and the end of its vCPU or of the machine. Every node applies batches in ticket order.
//!
//! Layout (little-endian): a 24-byte header (magic `VSB1`, the ticket, the sender, the record
//! count, the total length), then records, each a 12-byte header (kind, two 32-bit arguments)
//! and, for diffs and console output, a payload of the second argument's length. A batch from
//! a peer is checked whole (every record, every diff run, every page and rank in range) before
//! any of it is applied, so a damaged batch is an error naming the sender, never a panic or a
//! half-applied batch.
#![forbid(unsafe_code)]

use vsmp_fabric::NodeId;

use crate::diff::{self, DiffError};
use crate::{PAGE_BYTES, PageNo};

const MAGIC: &[u8; 4] = b"VSB1";

/// Bytes of a batch header.
pub const HEADER_BYTES: usize = 24;

/// Bytes of a record header.
pub const RECORD_HEADER: usize = 12;

const KIND_DIFF: u8 = 1;
const KIND_TRANSFER: u8 = 2;
const KIND_CONSOLE: u8 = 3;
const KIND_VCPU_DONE: u8 = 4;
const KIND_EXIT: u8 = 5;

/// The most bytes a batch of `pages` dirty pages and `console` console bytes takes, plus the
/// transfers and ends a batch may carry.
pub fn max_len(pages: usize, console: usize, transfers: usize) -> usize {
    HEADER_BYTES
        + pages * (RECORD_HEADER + diff::MAX_DIFF_BYTES)
        + (RECORD_HEADER + console)
        + transfers * RECORD_HEADER
        + 2 * RECORD_HEADER
}

/// One effect in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    /// The bytes of `page` that changed, as a diff against its twin.
    Diff { page: PageNo, diff: &'a [u8] },
    /// From this batch on, `to` owns `page`.
    Transfer { page: PageNo, to: NodeId },
    /// Bytes the sender's vCPU wrote to the console, in order.
    Console(&'a [u8]),
    /// The sender's vCPU finished with this status (its `main` returned).
    VcpuDone(u8),
    /// The sender's vCPU stopped the machine with this status.
    Exit(u8),
}

/// Builds a batch in a reusable buffer.
#[derive(Debug)]
pub struct BatchWriter {
    buf: Vec<u8>,
    records: u32,
}

impl BatchWriter {
    /// A writer whose buffer holds `capacity` bytes without growing.
    pub fn with_capacity(capacity: usize) -> BatchWriter {
        BatchWriter {
            buf: Vec::with_capacity(capacity),
            records: 0,
        }
    }

    /// Starts a batch from `sender` (its ticket is set later, with [`BatchWriter::finish`]).
    pub fn begin(&mut self, sender: NodeId) {
        self.buf.clear();
        self.records = 0;
        self.buf.extend_from_slice(MAGIC);
        self.buf.extend_from_slice(&0u64.to_le_bytes());
        self.buf.extend_from_slice(&sender.0.to_le_bytes());
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&0u32.to_le_bytes());
        self.buf.extend_from_slice(&0u32.to_le_bytes());
    }

    fn record(&mut self, kind: u8, a: u32, b: u32) {
        self.buf.extend_from_slice(&[kind, 0, 0, 0]);
        self.buf.extend_from_slice(&a.to_le_bytes());
        self.buf.extend_from_slice(&b.to_le_bytes());
        self.records += 1;
    }

    /// Adds the diff of `page` against `twin`; whether the page had changed.
    pub fn diff(&mut self, page: PageNo, twin: &[u8], now: &[u8]) -> bool {
        let at = self.buf.len();
        self.record(KIND_DIFF, page.0, 0);
        let body = self.buf.len();
        if diff::encode(twin, now, &mut self.buf) == 0 {
            self.buf.truncate(at);
            self.records -= 1;
            return false;
        }
        let len = (self.buf.len() - body) as u32;
        self.buf[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        true
    }

    pub fn transfer(&mut self, page: PageNo, to: NodeId) {
        self.record(KIND_TRANSFER, page.0, u32::from(to.0));
    }

    pub fn console(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.record(KIND_CONSOLE, 0, bytes.len() as u32);
        self.buf.extend_from_slice(bytes);
    }

    pub fn vcpu_done(&mut self, status: u8) {
        self.record(KIND_VCPU_DONE, u32::from(status), 0);
    }

    pub fn exit(&mut self, status: u8) {
        self.record(KIND_EXIT, u32::from(status), 0);
    }

    /// Whether the batch carries anything.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Sets the lengths; the finished batch's bytes, its ticket still 0 (see [`set_ticket`]).
    pub fn finish(&mut self) -> &[u8] {
        let len = self.buf.len() as u32;
        self.buf[16..20].copy_from_slice(&self.records.to_le_bytes());
        self.buf[20..24].copy_from_slice(&len.to_le_bytes());
        &self.buf
    }

    /// The batch as built so far (its ticket not yet set).
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// Stamps a finished batch with its ticket (taken after the batch was captured).
pub fn set_ticket(batch: &mut [u8], ticket: u64) {
    batch[4..12].copy_from_slice(&ticket.to_le_bytes());
}

/// Why a batch from a peer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("a batch is cut short ({len} bytes)")]
    Truncated { len: usize },
    #[error("not a batch (bad magic)")]
    Magic,
    #[error("the batch says it has {said} bytes but {len} were given")]
    Length { said: usize, len: usize },
    #[error("the batch claims to come from {claimed}, not {from}")]
    Sender { claimed: NodeId, from: NodeId },
    #[error("record {index} has unknown kind {kind}")]
    Kind { index: u32, kind: u8 },
    #[error("record {index} is cut short")]
    RecordTruncated { index: u32 },
    #[error("record {index} names page {page:#x}, outside guest memory")]
    Page { index: u32, page: u32 },
    #[error("record {index} names node {node}, outside the group")]
    Node { index: u32, node: u32 },
    #[error("record {index}: {source}")]
    Diff {
        index: u32,
        #[source]
        source: DiffError,
    },
    #[error("the batch has ticket 0")]
    Ticket,
}

/// A checked batch.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub ticket: u64,
    pub sender: NodeId,
    records: u32,
    body: &'a [u8],
}

impl<'a> Batch<'a> {
    /// Checks `bytes` as a batch sent by `from` in a group of `nodes` over `pages` pages.
    pub fn parse(
        bytes: &'a [u8],
        from: NodeId,
        nodes: usize,
        pages: usize,
    ) -> Result<Batch<'a>, BatchError> {
        if bytes.len() < HEADER_BYTES {
            return Err(BatchError::Truncated { len: bytes.len() });
        }
        if &bytes[0..4] != MAGIC {
            return Err(BatchError::Magic);
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let ticket = u64::from_le_bytes(bytes[4..12].try_into().expect("8 bytes"));
        let sender = NodeId(u16::from_le_bytes([bytes[12], bytes[13]]));
        let records = u32_at(16);
        let said = u32_at(20) as usize;
        if said != bytes.len() {
            return Err(BatchError::Length {
                said,
                len: bytes.len(),
            });
        }
        if sender != from {
            return Err(BatchError::Sender {
                claimed: sender,
                from,
            });
        }
        if ticket == 0 {
            return Err(BatchError::Ticket);
        }
        let batch = Batch {
            ticket,
            sender,
            records,
            body: &bytes[HEADER_BYTES..],
        };
        // Every record is checked before the batch is accepted.
        let mut it = batch.raw_records();
        for index in 0..records {
            let (kind, a, b, payload) = it
                .next()
                .ok_or(BatchError::RecordTruncated { index })?
                .map_err(|()| BatchError::RecordTruncated { index })?;
            let page_ok = |p: u32| {
                if (p as usize) < pages {
                    Ok(())
                } else {
                    Err(BatchError::Page { index, page: p })
                }
            };
            match kind {
                KIND_DIFF => {
                    page_ok(a)?;
                    diff::validate(payload).map_err(|source| BatchError::Diff { index, source })?;
                }
                KIND_TRANSFER => {
                    page_ok(a)?;
                    if b as usize >= nodes {
                        return Err(BatchError::Node { index, node: b });
                    }
                }
                KIND_CONSOLE | KIND_VCPU_DONE | KIND_EXIT => {}
                kind => return Err(BatchError::Kind { index, kind }),
            }
        }
        if it.next().is_some() {
            return Err(BatchError::Length {
                said,
                len: bytes.len() + 1,
            });
        }
        Ok(batch)
    }

    fn raw_records(&self) -> impl Iterator<Item = Result<(u8, u32, u32, &'a [u8]), ()>> + 'a {
        let body = self.body;
        let mut at = 0usize;
        std::iter::from_fn(move || {
            if at >= body.len() {
                return None;
            }
            let Some(h) = body.get(at..at + RECORD_HEADER) else {
                at = body.len();
                return Some(Err(()));
            };
            let kind = h[0];
            let a = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
            let b = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
            let len = if matches!(kind, KIND_DIFF | KIND_CONSOLE) {
                b as usize
            } else {
                0
            };
            let start = at + RECORD_HEADER;
            let Some(payload) = body.get(start..start + len) else {
                at = body.len();
                return Some(Err(()));
            };
            at = start + len;
            Some(Ok((kind, a, b, payload)))
        })
    }

    /// The records, in order (the batch was checked: this never fails).
    pub fn records(&self) -> impl Iterator<Item = Record<'a>> + 'a {
        let n = self.records as usize;
        self.raw_records().take(n).map(|r| {
            let (kind, a, b, payload) = r.expect("a checked batch");
            match kind {
                KIND_DIFF => Record::Diff {
                    page: PageNo(a),
                    diff: payload,
                },
                KIND_TRANSFER => Record::Transfer {
                    page: PageNo(a),
                    to: NodeId(b as u16),
                },
                KIND_CONSOLE => Record::Console(payload),
                KIND_VCPU_DONE => Record::VcpuDone(a as u8),
                _ => Record::Exit(a as u8),
            }
        })
    }
}

/// Bytes a page diff record may take at most (for sizing buffers).
pub const MAX_DIFF_RECORD: usize = RECORD_HEADER + diff::MAX_DIFF_BYTES;

const _: () = assert!(PAGE_BYTES <= u16::MAX as usize + 1);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        let mut w = BatchWriter::with_capacity(64 << 10);
        w.begin(NodeId(1));
        let twin = vec![0u8; PAGE_BYTES];
        let mut page = twin.clone();
        page[100] = 9;
        assert!(w.diff(PageNo(3), &twin, &page));
        assert!(!w.diff(PageNo(4), &twin, &twin));
        w.transfer(PageNo(3), NodeId(2));
        w.console(b"hi\n");
        w.vcpu_done(7);
        let mut b = w.finish().to_vec();
        set_ticket(&mut b, 42);
        b
    }

    #[test]
    fn a_batch_round_trips_its_records_in_order() {
        let bytes = sample();
        let b = Batch::parse(&bytes, NodeId(1), 3, 16).unwrap();
        assert_eq!((b.ticket, b.sender), (42, NodeId(1)));
        let recs: Vec<_> = b.records().collect();
        assert_eq!(recs.len(), 4);
        assert!(matches!(
            recs[0],
            Record::Diff {
                page: PageNo(3),
                ..
            }
        ));
        assert_eq!(
            recs[1],
            Record::Transfer {
                page: PageNo(3),
                to: NodeId(2)
            }
        );
        assert_eq!(recs[2], Record::Console(b"hi\n"));
        assert_eq!(recs[3], Record::VcpuDone(7));
    }

    #[test]
    fn a_batch_naming_pages_or_nodes_outside_the_machine_is_refused() {
        let bytes = sample();
        assert!(matches!(
            Batch::parse(&bytes, NodeId(1), 3, 3),
            Err(BatchError::Page { page: 3, .. })
        ));
        assert!(matches!(
            Batch::parse(&bytes, NodeId(1), 2, 16),
            Err(BatchError::Node { node: 2, .. })
        ));
        assert!(matches!(
            Batch::parse(&bytes, NodeId(0), 3, 16),
            Err(BatchError::Sender { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn damaged_batches_are_errors_not_panics(
            flips in proptest::collection::vec((0usize..200, any::<u8>()), 1..6),
            cut in 0usize..200,
        ) {
            let mut bytes = sample();
            for (at, x) in flips {
                if let Some(b) = bytes.get_mut(at) {
                    *b ^= x;
                }
            }
            bytes.truncate(cut.max(1).min(bytes.len()));
            if let Ok(b) = Batch::parse(&bytes, NodeId(1), 3, 16) {
                // Whatever was accepted reads back without panicking.
                let _ = b.records().count();
            }
        }
    }
}
