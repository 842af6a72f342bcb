//! Errors of the image format; every variant names the file (and offset) concerned.

use std::path::PathBuf;

/// Something is wrong with an image, or it could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An I/O error on a file of the image.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file does not start with the expected magic bytes.
    #[error("{path}: not a Stasis {what} (bad magic at offset 0)")]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// What it should have been.
        what: &'static str,
    },
    /// The file was written by a format version we do not read.
    #[error(
        "{path}: image format version {found} is not supported (this Stasis reads version {supported}); use the Stasis release that wrote it"
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Version found.
        found: u32,
        /// Version supported.
        supported: u32,
    },
    /// The file ends before the data it announces.
    #[error("{path}: truncated at offset {offset}: expected {expected} more bytes")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Where the missing data starts.
        offset: u64,
        /// How many bytes are missing at least.
        expected: u64,
    },
    /// A pack does not end with its trailer: it was cut short, or its end overwritten.
    #[error(
        "{path}: truncated or overwritten: it ends at byte {len} without the trailer every finished pack ends with; the image is damaged"
    )]
    NoTrailer {
        /// The pack.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// Data does not match its checksum.
    #[error("{path}: checksum mismatch at offset {offset} ({what}): the image is damaged")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Offset of the damaged record.
        offset: u64,
        /// What record.
        what: String,
    },
    /// A size field is beyond what the format allows.
    #[error("{path}: {what} at offset {offset} is {size} bytes, over the limit of {limit}")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The field.
        what: &'static str,
        /// Where.
        offset: u64,
        /// The size found.
        size: u64,
        /// The cap.
        limit: u64,
    },
    /// The manifest is well-formed bytes but not a valid manifest.
    #[error("{path}: invalid manifest: {message}")]
    InvalidManifest {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// No generation exists where one was asked for.
    #[error("{path}: no such generation ({detail})")]
    NoGeneration {
        /// The directory looked in.
        path: PathBuf,
        /// Details.
        detail: String,
    },
}

/// Result of image operations.
pub type ImageResult<T> = Result<T, ImageError>;

/// Attaches a path to an io error.
pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.into();
    move |source| ImageError::Io { path, source }
}
