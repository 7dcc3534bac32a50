//! The guest image loader: a static, non-PIE x86-64 ELF executable whose `PT_LOAD` segments lie
//! inside guest RAM above [`layout::IMAGE_BASE`]. The image is validated completely before a
//! byte is copied, and every refusal says why.

use std::path::{Path, PathBuf};

use goblin::elf::Elf;
use goblin::elf::header::{EI_CLASS, ELFCLASS64, EM_X86_64, ET_DYN, ET_EXEC};
use goblin::elf::program_header::{PT_DYNAMIC, PT_INTERP, PT_LOAD};

use super::memory::{GuestMemory, MemSize};
use crate::layout;
use crate::marker::{MARKER_SECTION, Marker};

/// Largest guest image file read (a guest larger than the largest RAM cannot fit anyway).
const MAX_IMAGE_FILE_BYTES: u64 = layout::MAX_MEM_BYTES;

/// Why an ELF file is not a loadable vsmp guest.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot read the file")]
    Read(#[source] std::io::Error),
    #[error("the file is {bytes} bytes, more than the largest guest RAM")]
    FileTooLarge { bytes: u64 },
    #[error("not a valid ELF file")]
    Parse(#[source] goblin::error::Error),
    #[error("not a 64-bit ELF (ELF class {class})")]
    NotElf64 { class: u8 },
    #[error("not an x86-64 ELF (machine {machine}: {name})")]
    NotX86_64 { machine: u16, name: &'static str },
    #[error(
        "a position-independent (PIE or shared) ELF; vsmp guests are static, non-PIE executables (link with -no-pie -static)"
    )]
    PositionIndependent,
    #[error("not an executable ELF (type {kind})")]
    NotExecutable { kind: u16 },
    #[error(
        "a dynamically linked ELF (it has an interpreter or a dynamic section); vsmp guests are static"
    )]
    Dynamic,
    #[error("no PT_LOAD segment")]
    NoLoadSegments,
    #[error("segment {index} has more file bytes ({file:#x}) than memory bytes ({mem:#x})")]
    SegmentFileLargerThanMemory { index: usize, file: u64, mem: u64 },
    #[error("segment {index}'s file bytes [{offset:#x}, +{len:#x}) lie outside the file")]
    SegmentOutsideFile { index: usize, offset: u64, len: u64 },
    #[error(
        "segment {index} at {start:#x} lies below the image base {:#x}",
        layout::IMAGE_BASE
    )]
    SegmentBelowImageBase { index: usize, start: u64 },
    #[error("segments {first} and {second} overlap")]
    SegmentsOverlap { first: usize, second: usize },
    #[error("the entry point {entry:#x} is not inside a loaded segment")]
    EntryOutsideImage { entry: u64 },
    #[error("section {MARKER_SECTION} names no known marker")]
    MarkerSection(#[source] crate::marker::UnknownMarker),
    #[error(
        "the image needs guest memory up to {end:#x} but --mem is {mem} ({:#x} bytes)",
        mem.bytes()
    )]
    TooLarge { end: u64, mem: MemSize },
}

/// An ELF that failed to load, with its path.
#[derive(Debug, thiserror::Error)]
#[error("cannot load guest {}", path.display())]
pub struct LoadError {
    pub path: PathBuf,
    #[source]
    pub source: ElfError,
}

/// One `PT_LOAD` segment: file bytes copied to `gpa`, zero-filled up to `mem_bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub gpa: u64,
    pub data: Vec<u8>,
    pub mem_bytes: u64,
}

impl Segment {
    fn end(&self) -> u64 {
        self.gpa + self.mem_bytes
    }
}

/// A validated guest image, independent of any guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub entry: u64,
    pub segments: Vec<Segment>,
    /// The marker recorded in [`MARKER_SECTION`], if the image has that section.
    pub marker: Option<Marker>,
}

impl GuestImage {
    /// Reads and validates the ELF at `path`.
    pub fn from_file(path: &Path) -> Result<GuestImage, LoadError> {
        let wrap = |source| LoadError {
            path: path.to_path_buf(),
            source,
        };
        let len = std::fs::metadata(path)
            .map_err(|e| wrap(ElfError::Read(e)))?
            .len();
        if len > MAX_IMAGE_FILE_BYTES {
            return Err(wrap(ElfError::FileTooLarge { bytes: len }));
        }
        let bytes = std::fs::read(path).map_err(|e| wrap(ElfError::Read(e)))?;
        GuestImage::parse(&bytes).map_err(wrap)
    }

    /// A flat image: `code` at [`layout::IMAGE_BASE`], entered at its first byte (benchmarks
    /// and tests that need no ELF).
    pub fn flat(code: &[u8], marker: Marker) -> GuestImage {
        GuestImage {
            entry: layout::IMAGE_BASE,
            segments: vec![Segment {
                gpa: layout::IMAGE_BASE,
                data: code.to_vec(),
                mem_bytes: code.len() as u64,
            }],
            marker: Some(marker),
        }
    }

    /// Validates ELF `bytes` as a vsmp guest.
    pub fn parse(bytes: &[u8]) -> Result<GuestImage, ElfError> {
        check_ident(bytes)?;
        let elf = Elf::parse(bytes).map_err(ElfError::Parse)?;
        let header = &elf.header;
        if header.e_machine != EM_X86_64 {
            return Err(ElfError::NotX86_64 {
                machine: header.e_machine,
                name: goblin::elf::header::machine_to_str(header.e_machine),
            });
        }
        match header.e_type {
            ET_EXEC => {}
            ET_DYN => return Err(ElfError::PositionIndependent),
            kind => return Err(ElfError::NotExecutable { kind }),
        }
        let phdrs = &elf.program_headers;
        if phdrs
            .iter()
            .any(|p| p.p_type == PT_INTERP || p.p_type == PT_DYNAMIC)
        {
            return Err(ElfError::Dynamic);
        }
        let mut segments = Vec::new();
        for (index, ph) in phdrs.iter().filter(|p| p.p_type == PT_LOAD).enumerate() {
            if ph.p_filesz > ph.p_memsz {
                return Err(ElfError::SegmentFileLargerThanMemory {
                    index,
                    file: ph.p_filesz,
                    mem: ph.p_memsz,
                });
            }
            let outside = ElfError::SegmentOutsideFile {
                index,
                offset: ph.p_offset,
                len: ph.p_filesz,
            };
            let file_end = ph.p_offset.checked_add(ph.p_filesz).ok_or(outside)?;
            if file_end > bytes.len() as u64 {
                return Err(ElfError::SegmentOutsideFile {
                    index,
                    offset: ph.p_offset,
                    len: ph.p_filesz,
                });
            }
            if ph.p_vaddr < layout::IMAGE_BASE {
                return Err(ElfError::SegmentBelowImageBase {
                    index,
                    start: ph.p_vaddr,
                });
            }
            if ph
                .p_vaddr
                .checked_add(ph.p_memsz)
                .is_none_or(|end| end > layout::MAX_MEM_BYTES)
            {
                return Err(ElfError::TooLarge {
                    end: ph.p_vaddr.saturating_add(ph.p_memsz),
                    mem: MemSize::new(layout::MAX_MEM_BYTES).expect("the maximum is in bounds"),
                });
            }
            if ph.p_memsz == 0 {
                continue;
            }
            segments.push(Segment {
                gpa: ph.p_vaddr,
                data: bytes[ph.p_offset as usize..file_end as usize].to_vec(),
                mem_bytes: ph.p_memsz,
            });
        }
        if segments.is_empty() {
            return Err(ElfError::NoLoadSegments);
        }
        check_no_overlap(&segments)?;
        let entry = header.e_entry;
        if !segments.iter().any(|s| (s.gpa..s.end()).contains(&entry)) {
            return Err(ElfError::EntryOutsideImage { entry });
        }
        let marker = marker_section(&elf, bytes)?;
        Ok(GuestImage {
            entry,
            segments,
            marker,
        })
    }

    /// One past the highest guest-physical address the image occupies.
    pub fn end(&self) -> u64 {
        self.segments.iter().map(Segment::end).max().unwrap_or(0)
    }

    /// Checks that the image fits in guest RAM of `size`.
    pub fn check_fits(&self, size: MemSize) -> Result<(), ElfError> {
        let end = self.end();
        if end > size.bytes() {
            return Err(ElfError::TooLarge { end, mem: size });
        }
        Ok(())
    }

    /// Copies the image into guest RAM (zero-filling each segment's tail).
    pub fn load_into(&self, mem: &GuestMemory) -> Result<(), ElfError> {
        self.check_fits(mem.size())?;
        let too_large = || ElfError::TooLarge {
            end: self.end(),
            mem: mem.size(),
        };
        const ZEROS: [u8; 4096] = [0; 4096];
        for seg in &self.segments {
            mem.write(seg.gpa, &seg.data).map_err(|_| too_large())?;
            let mut gpa = seg.gpa + seg.data.len() as u64;
            while gpa < seg.end() {
                let n = (seg.end() - gpa).min(ZEROS.len() as u64) as usize;
                mem.write(gpa, &ZEROS[..n]).map_err(|_| too_large())?;
                gpa += n as u64;
            }
        }
        Ok(())
    }
}

/// Checks the identification bytes before goblin parses the rest, so that a 32-bit ELF is
/// named as such rather than as a parse error.
fn check_ident(bytes: &[u8]) -> Result<(), ElfError> {
    if bytes.len() < 16 || &bytes[..4] != b"\x7fELF" {
        return Err(ElfError::Parse(goblin::error::Error::BadMagic(
            bytes.get(..8).map_or(0, |b| {
                let mut m = [0u8; 8];
                m[..b.len()].copy_from_slice(b);
                u64::from_le_bytes(m)
            }),
        )));
    }
    if bytes[EI_CLASS] != ELFCLASS64 {
        return Err(ElfError::NotElf64 {
            class: bytes[EI_CLASS],
        });
    }
    Ok(())
}

fn check_no_overlap(segments: &[Segment]) -> Result<(), ElfError> {
    for (i, a) in segments.iter().enumerate() {
        for (j, b) in segments.iter().enumerate().skip(i + 1) {
            if a.gpa < b.end() && b.gpa < a.end() {
                return Err(ElfError::SegmentsOverlap {
                    first: i,
                    second: j,
                });
            }
        }
    }
    Ok(())
}

fn marker_section(elf: &Elf<'_>, bytes: &[u8]) -> Result<Option<Marker>, ElfError> {
    let Some(sh) = elf
        .section_headers
        .iter()
        .find(|sh| elf.shdr_strtab.get_at(sh.sh_name) == Some(MARKER_SECTION))
    else {
        return Ok(None);
    };
    let start = sh.sh_offset as usize;
    let text = start
        .checked_add(sh.sh_size as usize)
        .and_then(|end| bytes.get(start..end))
        .unwrap_or(&[]);
    let text = String::from_utf8_lossy(text);
    let text = text.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    text.parse().map(Some).map_err(ElfError::MarkerSection)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 x86-64 executable: header, one PT_LOAD of `code` at `vaddr`, no sections.
    fn tiny_elf(e_type: u16, machine: u16, vaddr: u64, code: &[u8], memsz: u64) -> Vec<u8> {
        let mut f = vec![0u8; 64 + 56];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // ELFCLASS64
        f[5] = 1; // little endian
        f[6] = 1; // EV_CURRENT
        f[16..18].copy_from_slice(&e_type.to_le_bytes());
        f[18..20].copy_from_slice(&machine.to_le_bytes());
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&vaddr.to_le_bytes()); // e_entry
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        f[58..60].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
        let ph = &mut f[64..];
        ph[..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        ph[16..24].copy_from_slice(&vaddr.to_le_bytes());
        ph[24..32].copy_from_slice(&vaddr.to_le_bytes());
        ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        ph[40..48].copy_from_slice(&memsz.to_le_bytes());
        ph[48..56].copy_from_slice(&4096u64.to_le_bytes());
        f.extend_from_slice(code);
        f
    }

    const HLT: &[u8] = &[0xf4];

    #[test]
    fn a_static_executable_loads_its_segment_and_zeroes_its_tail() {
        let elf = tiny_elf(ET_EXEC, EM_X86_64, layout::IMAGE_BASE, &[0x90, 0xf4], 8);
        let image = GuestImage::parse(&elf).unwrap();
        assert_eq!(image.entry, layout::IMAGE_BASE);
        assert_eq!(image.marker, None);
        let mem = GuestMemory::new(MemSize::new(2 << 20).unwrap()).unwrap();
        mem.write(layout::IMAGE_BASE + 2, &[0xff; 6]).unwrap();
        image.load_into(&mem).unwrap();
        let mut b = [0xaau8; 8];
        mem.read(layout::IMAGE_BASE, &mut b).unwrap();
        assert_eq!(b, [0x90, 0xf4, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn an_aarch64_elf_is_refused_naming_the_machine() {
        let elf = tiny_elf(
            ET_EXEC,
            goblin::elf::header::EM_AARCH64,
            layout::IMAGE_BASE,
            HLT,
            1,
        );
        let err = GuestImage::parse(&elf).unwrap_err();
        assert!(matches!(err, ElfError::NotX86_64 { .. }), "{err}");
        assert!(err.to_string().contains("AARCH64"), "{err}");
    }

    #[test]
    fn a_32_bit_elf_is_refused_as_not_64_bit() {
        let mut elf = tiny_elf(ET_EXEC, 3, layout::IMAGE_BASE, HLT, 1);
        elf[4] = 1;
        let err = GuestImage::parse(&elf).unwrap_err();
        assert!(matches!(err, ElfError::NotElf64 { class: 1 }), "{err}");
    }

    #[test]
    fn a_pie_is_refused() {
        let elf = tiny_elf(ET_DYN, EM_X86_64, layout::IMAGE_BASE, HLT, 1);
        assert!(matches!(
            GuestImage::parse(&elf),
            Err(ElfError::PositionIndependent)
        ));
    }

    #[test]
    fn garbage_and_truncated_files_are_refused() {
        assert!(matches!(
            GuestImage::parse(b"#!/bin/sh\n"),
            Err(ElfError::Parse(_))
        ));
        let elf = tiny_elf(ET_EXEC, EM_X86_64, layout::IMAGE_BASE, HLT, 1);
        assert!(GuestImage::parse(&elf[..70]).is_err());
        let mut bad = elf.clone();
        bad[64 + 8..64 + 16].copy_from_slice(&u64::MAX.to_le_bytes()); // p_offset
        assert!(GuestImage::parse(&bad).is_err());
    }

    #[test]
    fn a_segment_below_the_image_base_is_refused() {
        let elf = tiny_elf(ET_EXEC, EM_X86_64, 0x1000, HLT, 1);
        assert!(matches!(
            GuestImage::parse(&elf),
            Err(ElfError::SegmentBelowImageBase { start: 0x1000, .. })
        ));
    }

    #[test]
    fn an_image_larger_than_guest_memory_is_refused() {
        let elf = tiny_elf(ET_EXEC, EM_X86_64, layout::IMAGE_BASE, HLT, 4 << 20);
        let image = GuestImage::parse(&elf).unwrap();
        let mem = GuestMemory::new(MemSize::new(2 << 20).unwrap()).unwrap();
        let err = image.load_into(&mem).unwrap_err();
        assert!(matches!(err, ElfError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("--mem is 2M"), "{err}");
    }

    #[test]
    fn an_entry_outside_every_segment_is_refused() {
        let mut elf = tiny_elf(ET_EXEC, EM_X86_64, layout::IMAGE_BASE, HLT, 1);
        elf[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes());
        assert!(matches!(
            GuestImage::parse(&elf),
            Err(ElfError::EntryOutsideImage { entry: 0x20_0000 })
        ));
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let err = GuestImage::from_file(Path::new("/nonexistent/guest.elf")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/guest.elf"), "{err}");
    }
}
