//! Page packs: a pack file's header and one frame read through a chunk reference taken
//! from the input itself (offset, lengths, compression flag, hash). Never a panic, never
//! an allocation sized by an unchecked field.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use stasis_image::manifest::ChunkRef;
use stasis_image::pack::PackReader;

fuzz_target!(|data: &[u8]| {
    if data.len() < 13 {
        return;
    }
    let (head, pack) = data.split_at(13);
    let word = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().unwrap());
    let chunk = ChunkRef {
        offset: u64::from(word(0)),
        stored_len: word(4),
        raw_len: word(8),
        zstd: head[12] & 1 == 1,
        blake3: blake3_of(pack),
    };
    let path = std::env::temp_dir().join(format!("stasis-fuzz-pack-{}", std::process::id()));
    std::fs::File::create(&path)
        .unwrap()
        .write_all(pack)
        .unwrap();
    if let Ok(mut reader) = PackReader::open(&path) {
        let _ = reader.read(&chunk);
    }
});

fn blake3_of(bytes: &[u8]) -> String {
    // A hash that matches when the frame holds the whole input, else a wrong one.
    stasis_image::hex::encode(&bytes.iter().fold([0u8; 32], |mut h, b| {
        h[usize::from(*b) % 32] ^= *b;
        h
    }))
}
