//! Manifest files: header (magic, version, crc32c, size cap), JSON body, cross-references.
//! Any input must give a manifest that passed validation or an error — never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stasis_image::generation::decode_manifest;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz/manifest");
    if let Ok(m) = decode_manifest(path, data) {
        // A manifest that decodes is one whose references a reader may follow.
        assert!(m.validate().is_ok());
    }
    // The body alone, with a correct header: reaches the JSON and validation checks.
    let mut framed = Vec::with_capacity(data.len() + 24);
    framed.extend_from_slice(b"STASISMF");
    framed.extend_from_slice(&stasis_image::manifest::FORMAT_VERSION.to_le_bytes());
    framed.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
    framed.extend_from_slice(&(data.len() as u64).to_le_bytes());
    framed.extend_from_slice(data);
    let _ = decode_manifest(path, &framed);
});
