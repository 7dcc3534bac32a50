//! Feeds arbitrary bytes to the tcp frame decoder: it must never panic nor allocate past the
//! bounds its header validation enforces. The same property runs on stable in CI as a
//! proptest (`wire::tests::random_bytes_never_panic_the_decoder`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vsmp_fabric::tcp::frame::{HEADER_BYTES, Header, decode_all};

fuzz_target!(|data: &[u8]| {
    let (frames, _err) = decode_all(data);
    assert!(frames * HEADER_BYTES <= data.len());
    if let Ok(raw) = <&[u8; HEADER_BYTES]>::try_from(data.get(..HEADER_BYTES).unwrap_or(&[])) {
        if let Ok(h) = Header::decode(raw) {
            assert_eq!(Header::decode(&h.encode()), Ok(h));
        }
    }
});
