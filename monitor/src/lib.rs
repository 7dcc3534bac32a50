//! The vsmp virtual machine monitor for one node.
//!
//! Guest code runs natively in a VM process traced by this monitor. Sensitive instructions are
//! preceded by a trap marker ([`marker`]) inserted by the assembly translator ([`patch`]); at
//! each trap the monitor decodes the instruction after the marker with iced-x86 and emulates it
//! against a virtual CPU, then resumes the guest after it.
#![forbid(unsafe_code)]

pub mod layout;
pub mod marker;
