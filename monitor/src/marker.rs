//! The trap marker: the instruction `vsmp patch` places immediately before every sensitive
//! instruction so that the VM process stops in the monitor, which then decodes and emulates
//! the instruction after the marker.
//!
//! `ud2` is the seed design's marker. In a KVM guest `#UD` is intercepted by the hypervisor and
//! costs about three times an `int3` round trip (DESIGN-BRIEF.md, section 10), so `int3` is
//! offered as the cheaper choice. A guest records the marker it was built with in an ELF
//! section, [`MARKER_SECTION`], holding the marker's name; `vsmp run` reads it from there.

use std::fmt;
use std::str::FromStr;

/// Name of the ELF section in which `vsmp cc` records the guest's marker (its [`Marker::name`]
/// as ASCII, no terminator required).
pub const MARKER_SECTION: &str = ".vsmp.marker";

/// Which instruction marks a sensitive instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Marker {
    /// `ud2` (`0f 0b`): the VM process stops with SIGILL, RIP at the marker.
    #[default]
    Ud2,
    /// `int3` (`cc`): the VM process stops with SIGTRAP, RIP just past the marker.
    Int3,
}

impl Marker {
    /// The marker's machine code.
    pub const fn bytes(self) -> &'static [u8] {
        match self {
            Marker::Ud2 => &[0x0f, 0x0b],
            Marker::Int3 => &[0xcc],
        }
    }

    /// The mnemonic as GNU `as` spells it, and as `--marker` accepts it.
    pub const fn name(self) -> &'static str {
        match self {
            Marker::Ud2 => "ud2",
            Marker::Int3 => "int3",
        }
    }

    /// Every marker, for tables, help text and benchmarks.
    pub const ALL: [Marker; 2] = [Marker::Ud2, Marker::Int3];
}

impl fmt::Display for Marker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A marker name that is neither `ud2` nor `int3`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown trap marker {0:?}: expected \"ud2\" or \"int3\"")]
pub struct UnknownMarker(pub String);

impl FromStr for Marker {
    type Err = UnknownMarker;

    fn from_str(s: &str) -> Result<Marker, UnknownMarker> {
        match s.trim() {
            "ud2" | "ud2a" => Ok(Marker::Ud2),
            "int3" => Ok(Marker::Int3),
            other => Err(UnknownMarker(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_names_round_trip_through_from_str() {
        for m in Marker::ALL {
            assert_eq!(m.name().parse::<Marker>().unwrap(), m);
        }
        assert_eq!("ud2a".parse::<Marker>().unwrap(), Marker::Ud2);
    }

    #[test]
    fn an_unknown_marker_is_named_in_the_error() {
        let err = "hlt".parse::<Marker>().unwrap_err();
        assert!(err.to_string().contains("\"hlt\""), "{err}");
    }

    #[test]
    fn marker_bytes_are_the_real_encodings() {
        assert_eq!(Marker::Ud2.bytes(), [0x0f, 0x0b]);
        assert_eq!(Marker::Int3.bytes(), [0xcc]);
    }
}
