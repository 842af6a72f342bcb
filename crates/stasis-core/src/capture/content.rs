//! The content of the job's regular files: a blake3 of each small file checked at restart,
//! and, with `--save-files`, the whole content of every file the job holds open or maps
//! shared, kept in the pack.
//!
//! Everything is read while the job is frozen, so that it is the content at the cut.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;

use stasis_image::manifest::{CONTENT_HASH_LIMIT, FileId, FileRun, SavedFile};
use stasis_image::pack::PackWriter;

use crate::error::{CoreError, CoreResult, io_err};

/// Bytes per chunk of a saved file (as for memory).
const RUN_BYTES: usize = 1 << 20;

/// A regular file (or device) met during capture: held open or mapped by a process.
#[derive(Debug)]
pub(crate) struct Found<'a> {
    /// The process (host pid) holding it.
    pub pid: i32,
    /// Its path.
    pub path: &'a str,
    /// Its metadata.
    pub meta: &'a std::fs::Metadata,
    /// Where to read it: `/proc/PID/fd/N`, or the path of a mapped file.
    pub source: &'a str,
    /// Open for reading, or mapped: checked at restart, by content when small. Else open
    /// only for writing: it need only exist at restart.
    pub checked: bool,
    /// With `--save-files`, keep its content (open files, shared mappings).
    pub save: bool,
    /// The job may write it (open for writing, or mapped shared and writable).
    pub written: bool,
}

/// Hashes and saved contents of a job's files, each file read at most once per checkpoint.
#[derive(Debug, Default)]
pub struct FileContents {
    /// Save the content of open files and shared-mapped files (`--save-files`).
    save: bool,
    /// Content hash of small files, by (device, inode); `None`: unreadable.
    hashes: HashMap<(u64, u64), Option<String>>,
    /// Saved files, in manifest order.
    pub(crate) saved: Vec<SavedFile>,
    /// Index in `saved` and inode of each saved path.
    by_path: HashMap<String, (usize, u64)>,
}

/// The identity fields of a file, without a content hash.
fn plain_id(path: &str, meta: &std::fs::Metadata) -> FileId {
    FileId {
        path: path.to_owned(),
        size: meta.len(),
        mtime_ns: mtime_ns(meta),
        ino: meta.ino(),
        regular: meta.file_type().is_file(),
        blake3: None,
    }
}

/// Modification time of `meta` in nanoseconds since the epoch.
pub(crate) fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
}

/// blake3 of a whole file read from `source`, if it can be read.
fn hash_file(source: &str) -> Option<String> {
    file_blake3(source).ok()
}

/// blake3 of the whole file at `path`, hex (shared with the checks at restart).
pub(crate) fn file_blake3(path: &str) -> std::io::Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path)?)?;
    Ok(h.finalize().to_hex().to_string())
}

impl FileContents {
    /// Contents of a job's files; with `save`, open files are kept in the image.
    pub fn new(save: bool) -> Self {
        FileContents {
            save,
            ..FileContents::default()
        }
    }

    /// The saved identity of file `f`. A small regular file that is checked gets its
    /// content hash; with `--save-files`, a regular file to save has its whole content
    /// stored in `pack`, once per path.
    pub(crate) fn file_id(&mut self, f: &Found<'_>, pack: &mut PackWriter) -> CoreResult<FileId> {
        let mut id = plain_id(f.path, f.meta);
        if !id.regular {
            return Ok(id);
        }
        if self.save && f.save {
            self.save(f, pack)?;
        }
        if f.checked && f.meta.len() <= CONTENT_HASH_LIMIT {
            let saved = self
                .by_path
                .get(f.path)
                .filter(|(_, ino)| *ino == f.meta.ino())
                .map(|(i, _)| self.saved[*i].blake3.clone());
            id.blake3 = self
                .hashes
                .entry((f.meta.dev(), f.meta.ino()))
                .or_insert_with(|| saved.or_else(|| hash_file(f.source)))
                .clone();
        }
        Ok(id)
    }

    /// Stores the whole content of file `f` unless already saved; a second file at the
    /// same path is refused.
    fn save(&mut self, f: &Found<'_>, pack: &mut PackWriter) -> CoreResult<()> {
        let (path, meta) = (f.path, f.meta);
        if let Some(&(i, ino)) = self.by_path.get(path) {
            if ino != meta.ino() {
                return Err(CoreError::Unsupported {
                    pid: f.pid,
                    what: format!("the content of {path}"),
                    why: "the job holds two different files that were at this path; only one could be recreated".into(),
                });
            }
            self.saved[i].written |= f.written;
            return Ok(());
        }
        let cannot = |e: std::io::Error| CoreError::Unsupported {
            pid: f.pid,
            what: format!("the content of {path} (--save-files)"),
            why: format!(
                "it cannot be read ({e}); make it readable, or checkpoint without --save-files"
            ),
        };
        let mut file = std::fs::File::open(f.source).map_err(cannot)?;
        let mut hasher = blake3::Hasher::new();
        let mut data = Vec::new();
        let mut buf = vec![0u8; RUN_BYTES];
        let mut offset = 0u64;
        loop {
            // Fill a whole run (a read may return less) so runs stay 1 MiB apart.
            let mut n = 0;
            while n < buf.len() {
                match file.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_err(path)(e)),
                }
            }
            if n == 0 {
                break;
            }
            let piece = &buf[..n];
            hasher.update(piece);
            if piece.iter().any(|&b| b != 0) {
                data.push(FileRun {
                    offset,
                    chunk: pack.add(piece)?,
                });
            }
            offset += n as u64;
            if n < buf.len() {
                break;
            }
        }
        self.by_path
            .insert(path.to_owned(), (self.saved.len(), meta.ino()));
        self.saved.push(SavedFile {
            path: path.to_owned(),
            size: offset,
            mode: meta.mode() & 0o7777,
            mtime_ns: mtime_ns(meta),
            blake3: hasher.finalize().to_hex().to_string(),
            written: f.written,
            data,
        });
        Ok(())
    }
}
