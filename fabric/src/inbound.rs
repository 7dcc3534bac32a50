//! Doorbells, messages and deaths waiting for `poll_incoming`, for the backends that queue
//! them in this process (sim, tcp; shm reads its rings straight into the caller's batch).
//!
//! Each source may have at most [`RECV_CREDITS`] items waiting: a source that sends past its
//! credits is refused ([`Overrun`]), which a backend treats as the source breaking the
//! protocol. Message buffers are reused, so receiving a message allocates only until the pool
//! holds as many as were ever waiting at once.
#![forbid(unsafe_code)]

use std::collections::VecDeque;

use crate::{DeathCause, IncomingBatch, MAX_MESSAGE_BYTES, NodeId, RECV_CREDITS};

#[derive(Debug)]
enum Item {
    Doorbell { from: NodeId, imm: u32 },
    Message { from: NodeId, data: Vec<u8> },
    Dead { peer: NodeId, cause: DeathCause },
}

/// A source sent more doorbells and messages than its receive credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Overrun;

/// One endpoint's queue of incoming items.
#[derive(Debug)]
pub(crate) struct Inbound {
    items: VecDeque<Item>,
    /// Per source: its items waiting here.
    waiting: Vec<u32>,
    pool: Vec<Vec<u8>>,
}

/// Items the queue is allocated for at first (it grows only past this, with many peers).
const INITIAL_ITEMS: usize = 4096;

impl Inbound {
    pub fn new(nodes: usize) -> Inbound {
        Inbound {
            items: VecDeque::with_capacity(INITIAL_ITEMS.min(nodes * RECV_CREDITS + nodes)),
            waiting: vec![0; nodes],
            pool: Vec::new(),
        }
    }

    fn admit(&mut self, from: NodeId) -> Result<(), Overrun> {
        let w = &mut self.waiting[from.index()];
        if *w as usize >= RECV_CREDITS {
            return Err(Overrun);
        }
        *w += 1;
        Ok(())
    }

    pub fn push_doorbell(&mut self, from: NodeId, imm: u32) -> Result<(), Overrun> {
        self.admit(from)?;
        self.items.push_back(Item::Doorbell { from, imm });
        Ok(())
    }

    pub fn push_message(&mut self, from: NodeId, bytes: &[u8]) -> Result<(), Overrun> {
        self.admit(from)?;
        let mut data = self.pool.pop().unwrap_or_default();
        data.clear();
        data.extend_from_slice(bytes);
        self.items.push_back(Item::Message { from, data });
        Ok(())
    }

    /// Queues a death, after everything `peer` delivered.
    pub fn push_dead(&mut self, peer: NodeId, cause: DeathCause) {
        self.items.push_back(Item::Dead { peer, cause });
    }

    /// Moves what fits into `out`, oldest first, calling `consumed(source)` for each doorbell
    /// and message taken (its credit may go back); how many items.
    pub fn take(&mut self, out: &mut IncomingBatch, mut consumed: impl FnMut(NodeId)) -> usize {
        let mut n = 0;
        while let Some(item) = self.items.front() {
            let len = match item {
                Item::Message { data, .. } => data.len(),
                _ => 0,
            };
            if !out.has_room(len) {
                break;
            }
            let from = match self.items.pop_front().expect("front exists") {
                Item::Doorbell { from, imm } => {
                    out.push_doorbell(from, imm);
                    Some(from)
                }
                Item::Message { from, data } => {
                    out.push_message(from, &data);
                    if data.capacity() <= 2 * MAX_MESSAGE_BYTES {
                        self.pool.push(data);
                    }
                    Some(from)
                }
                Item::Dead { peer, cause } => {
                    out.push_dead(peer, cause);
                    None
                }
            };
            if let Some(from) = from {
                self.waiting[from.index()] -= 1;
                consumed(from);
            }
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IncomingRef;

    #[test]
    fn items_come_out_in_order_and_each_credit_is_counted_once() {
        let mut q = Inbound::new(2);
        q.push_doorbell(NodeId(1), 5).unwrap();
        q.push_message(NodeId(0), b"m").unwrap();
        q.push_dead(NodeId(1), DeathCause::Closed);
        let mut out = IncomingBatch::new(8);
        let mut back = Vec::new();
        assert_eq!(q.take(&mut out, |s| back.push(s)), 3);
        assert_eq!(back, vec![NodeId(1), NodeId(0)]);
        let items: Vec<_> = out.iter().collect();
        assert_eq!(
            items[1],
            IncomingRef::Message {
                from: NodeId(0),
                data: b"m"
            }
        );
    }

    #[test]
    fn a_source_past_its_credits_is_refused_until_its_items_are_taken() {
        let mut q = Inbound::new(2);
        for k in 0..RECV_CREDITS as u32 {
            q.push_doorbell(NodeId(1), k).unwrap();
        }
        assert_eq!(q.push_message(NodeId(1), b"x"), Err(Overrun));
        q.push_doorbell(NodeId(0), 1).unwrap();
        let mut out = IncomingBatch::new(1);
        q.take(&mut out, |_| {});
        q.push_doorbell(NodeId(1), 99).unwrap();
    }
}
