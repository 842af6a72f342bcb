//! The image format on real files: round trips, atomic generations, and every kind of damage
//! reported with the file and offset.

use std::path::Path;

use stasis_image::generation::{
    MANIFEST_FILE, generation_dir, list_generations, read_manifest, resolve, write_manifest,
};
use stasis_image::manifest::{
    FileRun, JobInfo, Manifest, MmFields, Namespaces, PageRun, ProcessImage, Rseq, SavedFile,
    ThreadImage, Vma, VmaKind,
};
use stasis_image::pack::{Compression, PACK_FILE};
use stasis_image::verify::verify;
use stasis_image::{GenerationWriter, ImageError, OpenGeneration};

fn manifest(chunk: u32) -> Manifest {
    Manifest {
        job: JobInfo {
            name: "t".into(),
            generation: 0,
            created_unix_ms: 1,
            reason: "checkpoint".into(),
            command: vec!["prog".into()],
            namespaces: Namespaces::default(),
            monotonic_ns: 5,
            boottime_ns: 6,
            kernel: "k".into(),
            host: "h".into(),
            vdso_blake3: "00".into(),
            uid: 0,
            gid: 0,
            save_files: false,
        },
        processes: vec![ProcessImage {
            pid: 2,
            ppid: 0,
            exe: "/bin/true".into(),
            cmdline: vec![],
            cwd: "/".into(),
            umask: 0o22,
            mm: MmFields::default(),
            auxv: vec![],
            rlimits: vec![],
            sigactions: vec![],
            shared_pending: vec![vec![1; 128]],
            itimers: vec![],
            posix_timers: vec![],
            caps: [0; 3],
            personality: 0,
            threads: vec![ThreadImage {
                tid: 2,
                regs: vec![0; 27],
                xstate: vec![7; 576],
                sigmask: 0,
                pending: vec![],
                rseq: Rseq::default(),
                robust_list: (0, 0),
                clear_child_tid: 0,
                sigaltstack: (0, 2, 0),
                comm: "t".into(),
            }],
            vmas: vec![Vma {
                start: 0x10000,
                end: 0x20000,
                prot: 3,
                shared: false,
                growsdown: false,
                kind: VmaKind::Anon,
                file: None,
                offset: 0,
                pages: vec![PageRun {
                    addr: 0x10000,
                    chunk,
                }],
                shmem: None,
                sysv: None,
            }],
            fds: vec![],
            ..ProcessImage::default()
        }],
        files: vec![],
        shared_memory: vec![],
        sysv_shm: vec![],
        sysv_sem: vec![],
        sysv_msg: vec![],
        ptys: vec![],
        saved_files: vec![],
        chunks: vec![],
    }
}

/// Writes a generation with one compressible and one incompressible chunk.
fn write_generation(job: &Path) -> (u32, std::path::PathBuf, Vec<u8>) {
    let mut w = GenerationWriter::begin(job, Compression::Zstd(1)).unwrap();
    let mut noise = vec![0u8; 8192];
    let mut x: u32 = 1;
    for b in &mut noise {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let c = w.pack().add(&noise).unwrap();
    w.pack().add(&[9u8; 4096]).unwrap();
    let mut m = manifest(c);
    let (n, dir) = w.finish(&mut m).unwrap();
    (n, dir, noise)
}

#[test]
fn round_trip_and_numbering() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("job");
    let (n1, dir1, noise) = write_generation(&job);
    let (n2, _, _) = write_generation(&job);
    assert_eq!((n1, n2), (1, 2));
    assert_eq!(list_generations(&job), vec![1, 2]);
    assert_eq!(resolve(&job, None).unwrap(), generation_dir(&job, 2));
    assert!(resolve(&job, Some(7)).is_err());
    let mut g = OpenGeneration::open(&dir1).unwrap();
    assert_eq!(g.manifest.job.generation, 1);
    assert!(
        !g.manifest.chunks[0].zstd,
        "incompressible data is stored raw"
    );
    assert!(g.manifest.chunks[1].zstd, "compressible data is compressed");
    assert_eq!(g.chunk(0).unwrap(), noise);
    assert_eq!(g.chunk(1).unwrap(), vec![9u8; 4096]);
    let report = verify(&dir1).unwrap();
    assert_eq!((report.chunks, report.raw_bytes), (2, 8192 + 4096));
}

#[test]
fn unfinished_generation_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("job");
    write_generation(&job);
    {
        let mut w = GenerationWriter::begin(&job, Compression::None).unwrap();
        w.pack().add(&[1u8; 4096]).unwrap();
        assert!(w.temp_dir().exists());
    }
    assert_eq!(list_generations(&job), vec![1]);
    let leftovers: Vec<_> = std::fs::read_dir(&job)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary directory removed");
    verify(&generation_dir(&job, 1)).unwrap();
}

#[test]
fn files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("job");
    let (_, dir, _) = write_generation(&job);
    for p in [job.clone(), dir.clone()] {
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o700,
            "{}",
            p.display()
        );
    }
    for f in [MANIFEST_FILE, PACK_FILE] {
        assert_eq!(
            std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777,
            0o600,
            "{f}"
        );
    }
}

fn flip(path: &Path, offset: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[offset] ^= 0x40;
    std::fs::write(path, b).unwrap();
}

#[test]
fn bit_flip_in_page_data_names_file_and_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir, _) = write_generation(&tmp.path().join("job"));
    let m = read_manifest(&dir.join(MANIFEST_FILE)).unwrap();
    flip(&dir.join(PACK_FILE), m.chunks[0].offset as usize + 16 + 100);
    let e = verify(&dir).unwrap_err();
    assert!(
        matches!(e, ImageError::Corrupt { offset, .. } if offset == m.chunks[0].offset),
        "{e}"
    );
    let text = e.to_string();
    assert!(
        text.contains("pages.pack") && text.contains(&m.chunks[0].offset.to_string()),
        "{text}"
    );
}

#[test]
fn truncation_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir, _) = write_generation(&tmp.path().join("job"));
    let pack = dir.join(PACK_FILE);
    let len = std::fs::metadata(&pack).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    assert!(matches!(
        verify(&dir).unwrap_err(),
        ImageError::Truncated { .. }
    ));
    let man = dir.join(MANIFEST_FILE);
    let mlen = std::fs::metadata(&man).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&man)
        .unwrap()
        .set_len(mlen / 2)
        .unwrap();
    let e = read_manifest(&man).unwrap_err();
    assert!(matches!(e, ImageError::Truncated { .. }), "{e}");
    std::fs::write(&man, b"STAS").unwrap();
    assert!(matches!(
        read_manifest(&man).unwrap_err(),
        ImageError::Truncated { offset: 4, .. }
    ));
}

#[test]
fn foreign_version_bad_magic_and_bad_crc_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir, _) = write_generation(&tmp.path().join("job"));
    let man = dir.join(MANIFEST_FILE);
    let good = std::fs::read(&man).unwrap();
    let mut v = good.clone();
    v[8] = 9;
    std::fs::write(&man, &v).unwrap();
    let e = read_manifest(&man).unwrap_err();
    assert!(
        matches!(
            e,
            ImageError::UnsupportedVersion {
                found: 9,
                supported: 1,
                ..
            }
        ),
        "{e}"
    );
    let mut m = good.clone();
    m[0] = b'X';
    std::fs::write(&man, &m).unwrap();
    assert!(matches!(
        read_manifest(&man).unwrap_err(),
        ImageError::BadMagic { .. }
    ));
    let mut c = good.clone();
    let last = c.len() - 2;
    c[last] ^= 1;
    std::fs::write(&man, &c).unwrap();
    assert!(matches!(
        read_manifest(&man).unwrap_err(),
        ImageError::Corrupt { offset: 24, .. }
    ));
    let mut big = good;
    big[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&man, &big).unwrap();
    assert!(
        matches!(
            read_manifest(&man).unwrap_err(),
            ImageError::TooLarge { .. }
        ),
        "a huge length field is capped, not allocated"
    );
}

#[test]
fn inconsistent_manifest_is_invalid() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir, _) = write_generation(&tmp.path().join("job"));
    let man = dir.join(MANIFEST_FILE);
    let mut m = read_manifest(&man).unwrap();
    m.processes[0].vmas[0].pages[0].chunk = 99;
    write_manifest(&man, &m).unwrap();
    let e = read_manifest(&man).unwrap_err();
    assert!(
        matches!(e, ImageError::InvalidManifest { .. }) && e.to_string().contains("chunk 99"),
        "{e}"
    );
    m.processes[0].vmas[0].pages[0] = PageRun {
        addr: 0x1f000,
        chunk: 0,
    };
    write_manifest(&man, &m).unwrap();
    assert!(
        read_manifest(&man)
            .unwrap_err()
            .to_string()
            .contains("outside mapping")
    );
    std::fs::write(
        &man,
        [
            &b"STASISMF"[..],
            &1u32.to_le_bytes(),
            &crc32c::crc32c(b"{}").to_le_bytes(),
            &2u64.to_le_bytes(),
            b"{}",
        ]
        .concat(),
    )
    .unwrap();
    assert!(matches!(
        read_manifest(&man).unwrap_err(),
        ImageError::InvalidManifest { .. }
    ));
}

#[test]
fn saved_files_round_trip_and_are_validated() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir, _) = write_generation(&tmp.path().join("job"));
    let man = dir.join(MANIFEST_FILE);
    let mut m = read_manifest(&man).unwrap();
    // Written before saved files existed: the fields read as absent.
    assert!(m.saved_files.is_empty() && !m.job.save_files);
    let text = String::from_utf8_lossy(&std::fs::read(&man).unwrap()).into_owned();
    assert!(!text.contains("saved_files") && !text.contains("save_files"));
    m.job.save_files = true;
    m.saved_files.push(SavedFile {
        path: "/data/in.dat".into(),
        size: 10000,
        mode: 0o640,
        mtime_ns: 7,
        blake3: "ab".repeat(32),
        written: true,
        data: vec![FileRun {
            offset: 4096,
            chunk: 1,
        }],
    });
    write_manifest(&man, &m).unwrap();
    assert_eq!(read_manifest(&man).unwrap(), m);
    // A run past the file's end, a missing chunk, a relative path, a path saved twice.
    let bad = |edit: &dyn Fn(&mut Manifest), needle: &str| {
        let mut b = m.clone();
        edit(&mut b);
        write_manifest(&man, &b).unwrap();
        let e = read_manifest(&man).unwrap_err();
        assert!(
            matches!(e, ImageError::InvalidManifest { .. }) && e.to_string().contains(needle),
            "{needle}: {e}"
        );
    };
    bad(&|b| b.saved_files[0].size = 5000, "beyond its size");
    bad(&|b| b.saved_files[0].data[0].chunk = 99, "chunk 99");
    bad(&|b| b.saved_files[0].path = "in.dat".into(), "absolute");
    bad(
        &|b| b.saved_files.push(b.saved_files[0].clone()),
        "saved twice",
    );
}
