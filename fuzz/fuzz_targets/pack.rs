//! Pack files: a pack file's header, its trailer of content addresses, and one frame read
//! through a frame record taken from the input itself (offset, lengths, compression flag).
//! Never a panic, never an allocation sized by an unchecked field.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use stasis_image::index::Frame;
use stasis_image::pack::PackReader;

fuzz_target!(|data: &[u8]| {
    if data.len() < 13 {
        return;
    }
    let (head, pack) = data.split_at(13);
    let word = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().unwrap());
    let frame = Frame {
        pack: 0,
        offset: u64::from(word(0)),
        stored_len: word(4),
        raw_len: word(8),
        zstd: head[12] & 1 == 1,
    };
    let path = std::env::temp_dir().join(format!("stasis-fuzz-pack-{}", std::process::id()));
    std::fs::File::create(&path)
        .unwrap()
        .write_all(pack)
        .unwrap();
    if let Ok(mut reader) = PackReader::open(&path) {
        if let Ok(hashes) = reader.hashes() {
            let _ = hashes.of_frame(frame.offset);
        }
        let _ = reader.read_frame(&frame);
    }
});
