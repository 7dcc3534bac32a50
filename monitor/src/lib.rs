//! The vsmp virtual machine monitor for one node.
//!
//! Guest code runs natively in a VM process traced by this monitor. Sensitive instructions are
//! preceded by a trap marker ([`marker`]) inserted by the assembly translator ([`patch`]); at
//! each trap the monitor decodes the instruction after the marker with iced-x86 and emulates it
//! against a virtual CPU ([`vcpu`], [`emulate`], [`devices`]) through the [`platform`] trait,
//! then resumes the guest after it. [`vm`] holds the VM process, the ELF loader and the ptrace
//! run loop; only its `sys` modules contain `unsafe`.
#![deny(unsafe_code)]

pub mod devices;
pub mod emulate;
pub mod layout;
pub mod marker;
pub mod node;
pub mod patch;
pub mod platform;
pub mod vcpu;
pub mod vm;
