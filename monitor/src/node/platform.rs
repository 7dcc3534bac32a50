//! The [`Platform`] of a stopped vCPU on a node: its registers and guest RAM, with the DSM's
//! write hook. A write to a page the node may not write now (not owned, or not yet twinned)
//! writes nothing and faults; the page is remembered ([`NodePlatform::needs`]) so that the run
//! loop asks the engine for it and emulates the instruction again once it is writable.
#![forbid(unsafe_code)]

use crate::platform::{MemFault, Platform, Regs};
use crate::vm::memory::GuestMemory;
use crate::vm::protect::Protector;

const PAGE: u64 = 4096;

#[derive(Debug)]
pub struct NodePlatform<'a> {
    pub regs: Regs,
    memory: &'a GuestMemory,
    /// `None` on a machine of one node: every page is writable.
    protector: Option<&'a Protector>,
    needs: Option<(u64, usize)>,
}

impl<'a> NodePlatform<'a> {
    pub fn new(regs: Regs, memory: &'a GuestMemory, protector: Option<&'a Protector>) -> Self {
        NodePlatform {
            regs,
            memory,
            protector,
            needs: None,
        }
    }

    /// The write refused because its pages were not writable here, if any.
    pub fn needs(&self) -> Option<(u64, usize)> {
        self.needs
    }
}

impl Platform for NodePlatform<'_> {
    fn regs(&mut self) -> &mut Regs {
        &mut self.regs
    }

    fn read_mem(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), MemFault> {
        let len = buf.len();
        self.memory.read(gva, buf).map_err(|_| MemFault {
            gva,
            len,
            write: false,
        })
    }

    fn write_mem(&mut self, gva: u64, data: &[u8]) -> Result<(), MemFault> {
        let fault = MemFault {
            gva,
            len: data.len(),
            write: true,
        };
        self.memory.offset_of(gva, data.len()).map_err(|_| fault)?;
        if let Some(p) = self.protector {
            let last = gva + data.len().max(1) as u64 - 1;
            if !(gva / PAGE..=last / PAGE).all(|page| p.writable(page as u32)) {
                self.needs = Some((gva, data.len()));
                return Err(fault);
            }
        }
        self.memory.write(gva, data).map_err(|_| fault)
    }
}
