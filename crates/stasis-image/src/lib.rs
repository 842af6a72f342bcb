//! The Stasis on-disk image format.
//!
//! A *generation* is one directory holding a checksummed, versioned manifest
//! ([`manifest::Manifest`], the saved-state structs, kept apart from any runtime object) and a
//! pack files of compressed frames of content-addressed blobs, each checked against its
//! content address on every read.
//! Generations are written under a temporary name and renamed into place only when complete
//! and synced ([`generation`]). The format is documented in `docs/image-format.md`.
#![forbid(unsafe_code)]

pub mod compress;
pub mod error;
pub mod fault;
pub mod generation;
pub mod hex;
pub mod index;
pub mod manifest;
pub mod pack;
mod readahead;
mod sink;
pub mod verify;

pub use error::{ImageError, ImageResult};
pub use generation::{GenerationWriter, OpenGeneration};
pub use manifest::Manifest;
pub use readahead::READ_AHEAD;
