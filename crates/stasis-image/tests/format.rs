//! The image format on real files: round trips, atomic generations, and every kind of damage
//! reported with the file and offset.

use std::path::Path;

use stasis_image::generation::{
    MANIFEST_FILE, PACKS_DIR, generation_dir, list_generations, read_manifest, resolve,
    write_manifest,
};
use stasis_image::manifest::FORMAT_VERSION;
use stasis_image::manifest::{
    Advice, FileRun, JobInfo, Manifest, MmFields, Namespaces, PageRun, ProcessImage, Rseq,
    SavedFile, ThreadImage, Vma, VmaKind,
};
use stasis_image::pack::{Compression, Reused};
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
                end: 0x410000,
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
                advice: vec![Advice::WipeOnFork],
                noreserve: true,
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
        packs: vec![],
        chunks: Default::default(),
    }
}

/// The pack file generation `dir` wrote.
fn own_pack(dir: &Path) -> std::path::PathBuf {
    let m = read_manifest(&dir.join(MANIFEST_FILE)).unwrap();
    dir.parent().unwrap().join(PACKS_DIR).join(&m.packs[0])
}

/// The frame holding the first blob of chunk `c`.
fn frame_of(m: &Manifest, c: u32) -> stasis_image::index::Frame {
    m.chunks.frames[m.chunks.blobs_of(c)[0].frame as usize]
}

/// Writes a generation with one compressible and one incompressible chunk.
fn write_generation(job: &Path) -> (u32, std::path::PathBuf, Vec<u8>) {
    let mut w = GenerationWriter::begin(job, Compression::FAST).unwrap();
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
        !frame_of(&g.manifest, 0).zstd,
        "incompressible data is stored raw"
    );
    assert!(
        frame_of(&g.manifest, 1).zstd,
        "compressible data is compressed"
    );
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
    for f in [dir.join(MANIFEST_FILE), own_pack(&dir)] {
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600,
            "{}",
            f.display()
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
    let frame = frame_of(&m, 0);
    flip(&own_pack(&dir), frame.offset as usize + 16 + 100);
    let e = verify(&dir).unwrap_err();
    assert!(
        matches!(e, ImageError::Corrupt { offset, .. } if offset == frame.offset),
        "{e}"
    );
    let text = e.to_string();
    assert!(
        text.contains(&m.packs[0]) && text.contains(&frame.offset.to_string()),
        "{text}"
    );
}

#[test]
fn truncation_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir, _) = write_generation(&tmp.path().join("job"));
    let pack = own_pack(&dir);
    let len = std::fs::metadata(&pack).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    // Its end is the trailer of content addresses: missing, it is named.
    let err = verify(&dir).unwrap_err();
    assert!(
        matches!(&err, ImageError::NoTrailer { path, .. } if *path == pack),
        "{err}"
    );
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
                supported: FORMAT_VERSION,
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
    c[30] ^= 1;
    std::fs::write(&man, &c).unwrap();
    assert!(matches!(
        read_manifest(&man).unwrap_err(),
        ImageError::Corrupt { offset: 24, .. }
    ));
    // The binary chunk index after the JSON body has its own checksum.
    let mut x = good.clone();
    let last = x.len() - 2;
    x[last] ^= 1;
    std::fs::write(&man, &x).unwrap();
    let e = read_manifest(&man).unwrap_err();
    assert!(
        matches!(e, ImageError::Corrupt { offset, .. } if offset > 24),
        "{e}"
    );
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
        addr: 0x40f000,
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
            &FORMAT_VERSION.to_le_bytes(),
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

fn noise(len: usize, mut x: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for b in &mut v {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    v
}

fn write_one(job: &Path, data: &[u8], incremental: bool) -> std::path::PathBuf {
    let mut w = GenerationWriter::begin_with(job, Compression::FAST, incremental).unwrap();
    let c = w.pack().add(data).unwrap();
    w.finish(&mut manifest(c)).unwrap().1
}

fn packs(job: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(job.join(PACKS_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".pack"))
        .collect();
    v.sort();
    v
}

#[test]
fn unchanged_data_is_shared_and_survives_deleting_older_generations() {
    use stasis_image::generation::{collect_garbage, generation_size, remove_generation};
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("job");
    let mut data = noise(4 << 20, 7);
    let gen1 = write_one(&job, &data, true);
    // 1% of the pages change.
    for page in data.chunks_mut(4096).step_by(100) {
        page[0] ^= 1;
    }
    let gen2 = write_one(&job, &data, true);
    let (size1, size2) = (generation_size(&gen1), generation_size(&gen2));
    assert!(
        size2 * 20 < size1,
        "an incremental generation after a 1% change adds {size2} bytes, the full one {size1}"
    );
    let report = verify(&gen2).unwrap();
    assert_eq!(report.raw_bytes, 4 << 20);
    assert_eq!(
        report.shared_bytes,
        (4 << 20) - 11 * 4096,
        "11 pages changed"
    );
    assert_eq!(OpenGeneration::open(&gen2).unwrap().chunk(0).unwrap(), data);
    let m2 = read_manifest(&gen2.join(MANIFEST_FILE)).unwrap();
    let m1 = read_manifest(&gen1.join(MANIFEST_FILE)).unwrap();
    assert_eq!(m2.packs, vec![m2.packs[0].clone(), m1.packs[0].clone()]);

    // Deleting the generation whose pack the newer one shares keeps that pack.
    remove_generation(&job, 1).unwrap();
    assert_eq!(packs(&job), {
        let mut v = m2.packs.clone();
        v.sort();
        v
    });
    verify(&gen2).unwrap();
    assert_eq!(OpenGeneration::open(&gen2).unwrap().chunk(0).unwrap(), data);

    // A full generation shares nothing; once generation 2 is gone, both old packs go.
    let gen3 = write_one(&job, &data, false);
    assert_eq!(verify(&gen3).unwrap().shared_bytes, 0);
    remove_generation(&job, 2).unwrap();
    let m3 = read_manifest(&gen3.join(MANIFEST_FILE)).unwrap();
    assert_eq!(packs(&job), m3.packs);
    assert!(collect_garbage(&job).unwrap().is_empty());
    assert_eq!(OpenGeneration::open(&gen3).unwrap().chunk(0).unwrap(), data);
}

#[test]
fn identical_blobs_within_a_generation_are_stored_once() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("job");
    let page = noise(4096, 3);
    let data = page.repeat(64);
    let dir = write_one(&job, &data, true);
    let report = verify(&dir).unwrap();
    assert!(report.stored_bytes < 2 * 4096 + 64, "{report:?}");
    assert_eq!(OpenGeneration::open(&dir).unwrap().chunk(0).unwrap(), data);
}

#[test]
fn packs_of_crashed_writers_are_swept_but_never_a_live_writers() {
    use stasis_image::generation::collect_garbage;
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("job");
    write_one(&job, &noise(8192, 1), true);
    // A writer that crashed: its temporary directory and its pack are left behind.
    let stray = job.join(PACKS_DIR).join("pack-1-1.pack");
    std::fs::write(&stray, b"left by a writer that crashed").unwrap();
    std::fs::create_dir(job.join(".tmp-gen-4294967-1")).unwrap();
    let mut w = GenerationWriter::begin(&job, Compression::None).unwrap();
    assert!(!job.join(".tmp-gen-4294967-1").exists());
    assert!(
        !stray.exists(),
        "a new writer sweeps packs no generation references"
    );
    w.pack().add(&noise(4096, 2)).unwrap();
    std::fs::write(&stray, b"another").unwrap();
    assert!(
        collect_garbage(&job).unwrap().is_empty(),
        "no sweep while a writer is active"
    );
    assert!(stray.exists());
    assert_eq!(packs(&job).len(), 3, "the writer's own pack is kept");
    drop(w);
    assert_eq!(packs(&job).len(), 2, "an abandoned writer removes its pack");
    assert_eq!(
        collect_garbage(&job).unwrap(),
        vec!["pack-1-1.pack".to_string()]
    );
    assert_eq!(packs(&job).len(), 1);
}

#[test]
fn a_manifest_cannot_name_a_pack_outside_the_packs_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir, _) = write_generation(&tmp.path().join("job"));
    let man = dir.join(MANIFEST_FILE);
    let mut m = read_manifest(&man).unwrap();
    m.packs[0] = "../../../etc/passwd".into();
    write_manifest(&man, &m).unwrap();
    let e = read_manifest(&man).unwrap_err();
    assert!(e.to_string().contains("pack file name"), "{e}");
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

/// A writer knows where its base keeps each page of a process's anonymous memory, and a
/// chunk made of base blobs (as write tracking makes for unchanged pages, without reading
/// them) reads back as those pages; a blob the base does not have is refused.
#[test]
fn chunks_made_of_base_blobs_read_back_as_the_base_pages() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("job");
    let data = noise(16 * 4096, 11);
    let gen1 = write_one(&job, &data, true);
    let m1 = read_manifest(&gen1.join(MANIFEST_FILE)).unwrap();

    let mut w = GenerationWriter::begin(&job, Compression::FAST).unwrap();
    assert_eq!(w.pack().base().name(), Some(m1.packs[0].as_str()));
    let base = &w.pack().base().memory[&2];
    // The manifest's one run starts at 0x10000: page k is blob k.
    assert_eq!(base.blob_at(0x10000 + 5 * 4096), Some(5));
    assert_eq!(base.blob_at(0x10000 + 16 * 4096), None, "past the run");
    assert_eq!(base.blob_at(0xf000), None, "before the run");
    let c = w.pack().add_reused(Reused::Base, &[3, 4, 5]).unwrap();
    assert!(
        w.pack().add_reused(Reused::Base, &[16]).is_err(),
        "no blob 16 in the base"
    );
    let (_, gen2) = w.finish(&mut manifest(c)).unwrap();
    assert_eq!(
        OpenGeneration::open(&gen2).unwrap().chunk(c).unwrap(),
        data[3 * 4096..6 * 4096]
    );
    let v = verify(&gen2).unwrap();
    assert_eq!(v.shared_bytes, 3 * 4096, "{v:?}");
    // Lent from the base's frame, uncopied, checked all the same.
    let mut buf = Vec::new();
    let mut open = OpenGeneration::open(&gen2).unwrap();
    let lent = open.with_chunk(c, &mut buf, <[u8]>::to_vec).unwrap();
    assert_eq!(lent, data[3 * 4096..6 * 4096]);
    assert!(buf.is_empty(), "nothing was put together");
    let frame = frame_of(&m1, 0);
    let pack1 = job.join(PACKS_DIR).join(&m1.packs[0]);
    flip(&pack1, (frame.offset + 16) as usize + 4 * 4096 + 7);
    let err = OpenGeneration::open(&gen2)
        .unwrap()
        .with_chunk(c, &mut buf, <[u8]>::to_vec)
        .unwrap_err();
    assert!(
        matches!(&err, ImageError::Corrupt { path, .. } if *path == pack1),
        "{err}"
    );
}

/// A pre-copy stages pages before the cut; chunks made of staged blobs read back as those
/// pages, staged blobs no chunk uses only take room in the pack, new data equal to a
/// staged page is not stored again, and a staged blob that does not exist is refused.
#[test]
fn chunks_made_of_staged_blobs_read_back_as_the_staged_pages() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("job");
    let data = noise(8 * 4096, 21);
    let mut w = GenerationWriter::begin(&job, Compression::FAST).unwrap();
    let first = w.pack().stage(&data[..4 * 4096]).unwrap();
    let second = w.pack().stage(&data[4 * 4096..]).unwrap();
    assert_eq!((first, second), (0, 4));
    assert!(w.pack().reused_blob_follows(Reused::Staged, 1, 2));
    assert!(
        !w.pack().reused_blob_follows(Reused::Staged, 3, 4),
        "another frame"
    );
    // Blobs 1-3 follow 0 in its frame; 4 starts the next; 5-7 follow 4; there is no 8.
    let mut following = |first, at_most| {
        w.pack()
            .reused_blobs_following(Reused::Staged, first, at_most)
    };
    assert_eq!(following(0, 7), 3);
    assert_eq!(following(0, 2), 2);
    assert_eq!(following(4, 7), 3);
    assert_eq!(following(6, 0), 0);
    assert_eq!(following(7, 5), 0);
    assert_eq!(following(9, 5), 0);
    // Pages 4-7 whole, then pages 1-2 (page 0 and 3 rewritten since, say).
    let whole = w.pack().add_reused(Reused::Staged, &[4, 5, 6, 7]).unwrap();
    let part = w.pack().add_reused(Reused::Staged, &[1, 2]).unwrap();
    assert!(
        w.pack().add_reused(Reused::Staged, &[8]).is_err(),
        "no staged blob 8"
    );
    // New data equal to a staged page is not stored again.
    let before = w.pack().bytes_written();
    let again = w.pack().add(&data[..4096]).unwrap();
    assert_eq!(w.pack().bytes_written(), before, "page 0 was known");
    let mut m = manifest(whole);
    m.processes[0].vmas[0]
        .pages
        .push(stasis_image::manifest::PageRun {
            addr: 0x10000 + 16 * 4096,
            chunk: part,
        });
    m.processes[0].vmas[0]
        .pages
        .push(stasis_image::manifest::PageRun {
            addr: 0x10000 + 20 * 4096,
            chunk: again,
        });
    let (_, dir) = w.finish(&mut m).unwrap();
    let mut open = OpenGeneration::open(&dir).unwrap();
    assert_eq!(open.chunk(whole).unwrap(), data[4 * 4096..]);
    assert_eq!(open.chunk(part).unwrap(), data[4096..3 * 4096]);
    assert_eq!(open.chunk(again).unwrap(), data[..4096]);
    // A chunk that is a whole staged frame is read straight into the buffer, as a full
    // checkpoint's chunks are; part of one is lent from the frame cache.
    let mut buf = Vec::new();
    let read = open.with_chunk(whole, &mut buf, <[u8]>::to_vec).unwrap();
    assert_eq!(read, data[4 * 4096..]);
    assert_eq!(buf, data[4 * 4096..]);
    let mut buf = Vec::new();
    let lent = open.with_chunk(part, &mut buf, <[u8]>::to_vec).unwrap();
    assert_eq!(lent, data[4096..3 * 4096]);
    assert!(buf.is_empty(), "part of a staged frame is lent");
    let v = verify(&dir).unwrap();
    assert_eq!(v.raw_bytes, 7 * 4096, "{v:?}");
}

#[test]
fn a_writer_starts_from_what_the_last_one_carried_only_while_its_generation_is_newest() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("job");
    let mut data = noise(4 << 20, 5);
    let writes = std::cell::Cell::new(0u32);
    // The n-th write stores n chunks of new noise first (so the frames of its base take
    // other indices in its own index each time), then `data` as chunk n.
    let write = |data: &[u8], carried| {
        writes.set(writes.get() + 1);
        let n = writes.get();
        let mut w = GenerationWriter::begin_after(&job, Compression::FAST, carried).unwrap();
        let base = w.pack().base().name().map(str::to_owned);
        for k in 0..n {
            w.pack().add(&noise(4096, u64::from(n * 100 + k))).unwrap();
        }
        let c = w.pack().add(data).unwrap();
        assert_eq!(c, n);
        let (_, dir, carried) = w.finish_carrying(manifest(c)).unwrap();
        (base, dir, carried.carry())
    };
    let (_, gen1, carried) = write(&data, None);
    let pack1 = read_manifest(&gen1.join(MANIFEST_FILE)).unwrap().packs[0].clone();
    for page in data.chunks_mut(4096).step_by(100) {
        page[1] ^= 1;
    }
    // From what generation 1's writer carried: the same sharing as from the disk.
    let (base, gen2, carried) = write(&data, Some(carried));
    assert_eq!(base.as_deref(), Some(pack1.as_str()));
    let v = verify(&gen2).unwrap();
    assert_eq!(v.shared_bytes, (4 << 20) - 11 * 4096, "{v:?}");
    assert_eq!(OpenGeneration::open(&gen2).unwrap().chunk(2).unwrap(), data);
    // Generation 2 shares generation 1's frames: as a base, its blobs are known there too.
    let (_, gen3, _) = write(&data, Some(carried));
    assert_eq!(verify(&gen3).unwrap().shared_bytes, 4 << 20);
    assert_eq!(OpenGeneration::open(&gen3).unwrap().chunk(3).unwrap(), data);

    // Another writer wrote a newer generation: what generation 4's writer carried is stale.
    let (_, _, stale) = write(&data, None);
    let other = write_one(&job, &noise(4 << 20, 9), true);
    let newest = read_manifest(&other.join(MANIFEST_FILE)).unwrap().packs[0].clone();
    let (base, gen6, _) = write(&data, Some(stale));
    assert_eq!(
        base.as_deref(),
        Some(newest.as_str()),
        "the newest generation is the base"
    );
    assert_eq!(verify(&gen6).unwrap().shared_bytes, 0);
    assert_eq!(OpenGeneration::open(&gen6).unwrap().chunk(5).unwrap(), data);
}

/// Whether the filesystem of `dir` takes direct reads.
fn takes_direct_io(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join("direct-probe");
    std::fs::write(&probe, [0u8; 4096]).unwrap();
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .is_ok();
    std::fs::remove_file(&probe).unwrap();
    ok
}

/// A generation of large raw and compressed chunks and small ones (in a new temporary
/// directory), what each chunk holds, and whether its filesystem takes direct reads.
fn write_mixed() -> (tempfile::TempDir, std::path::PathBuf, Vec<Vec<u8>>, bool) {
    let tmp = tempfile::tempdir().unwrap();
    let direct = takes_direct_io(tmp.path());
    let mut w = GenerationWriter::begin(&tmp.path().join("job"), Compression::FAST).unwrap();
    let mut contents = Vec::new();
    for k in 0..12u64 {
        let data = match k % 3 {
            0 => noise(256 << 10, k + 1),
            // Compressible, but not below the size read directly.
            1 => noise(256 << 10, k + 1).iter().map(|b| b & 0x0f).collect(),
            _ => noise(4096, k + 1),
        };
        let c = w.pack().add(&data).unwrap();
        assert_eq!(c as usize, contents.len());
        contents.push(data);
    }
    let (_, dir) = w.finish(&mut manifest(0)).unwrap();
    (tmp, dir, contents, direct)
}

/// Chunks asked for ahead read back as written, in order or not, the large raw ones
/// through direct reads where the filesystem takes them.
#[test]
fn chunks_read_ahead_read_back_in_any_order() {
    let (_tmp, dir, contents, direct) = write_mixed();
    let m = read_manifest(&dir.join(MANIFEST_FILE)).unwrap();
    let compressed = frame_of(&m, 1);
    assert!(
        compressed.zstd && compressed.stored_len >= 64 << 10,
        "{compressed:?}"
    );
    for order in [
        (0..12).collect::<Vec<u32>>(),
        vec![5, 0, 1, 11, 2, 3, 4, 6, 10, 7, 8, 9],
    ] {
        let mut g = OpenGeneration::open(&dir).unwrap();
        for c in 0..12 {
            g.read_ahead(c);
        }
        let mut buf = Vec::new();
        for &c in &order {
            let got = g.with_chunk(c, &mut buf, <[u8]>::to_vec).unwrap();
            assert_eq!(got, contents[c as usize], "chunk {c}");
            // Asked for again after it was read: read again.
            g.read_ahead(c);
            assert_eq!(g.chunk(c).unwrap(), contents[c as usize], "chunk {c} again");
        }
        assert_eq!(
            g.frames_read_ahead() > 0,
            direct,
            "frames read directly: {}",
            g.frames_read_ahead()
        );
    }
}

/// A frame read ahead is checked like any other: damage names the pack and the frame.
#[test]
fn damage_in_a_frame_read_ahead_is_reported() {
    let (_tmp, dir, _, _) = write_mixed();
    let m = read_manifest(&dir.join(MANIFEST_FILE)).unwrap();
    let pack = own_pack(&dir);
    for (c, at) in [(3u32, 16 + 5000), (4, 16 + 7), (0, 2)] {
        let frame = frame_of(&m, c);
        flip(&pack, frame.offset as usize + at);
        let mut g = OpenGeneration::open(&dir).unwrap();
        g.read_ahead(c);
        let err = g.chunk(c).unwrap_err();
        assert!(
            matches!(&err, ImageError::Corrupt { path, offset, .. }
                if *path == pack && *offset == frame.offset),
            "chunk {c}: {err}"
        );
        flip(&pack, frame.offset as usize + at);
    }
    // A pack cut short once open: the read ahead comes back short, and the reading
    // reports it.
    let frame = frame_of(&m, 9);
    let mut g = OpenGeneration::open(&dir).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&pack).unwrap();
    f.set_len(frame.offset + 16 + 1000).unwrap();
    g.read_ahead(9);
    let err = g.chunk(9).unwrap_err();
    assert!(
        matches!(&err, ImageError::Truncated { path, .. } if *path == pack),
        "{err}"
    );
}

/// A generation opened before its pack was removed still reads ahead from that pack.
#[test]
fn a_removed_pack_is_still_read_ahead_from_the_open_file() {
    let (_tmp, dir, contents, direct) = write_mixed();
    let mut g = OpenGeneration::open(&dir).unwrap();
    std::fs::remove_file(own_pack(&dir)).unwrap();
    for c in 0..12 {
        g.read_ahead(c);
    }
    for c in 0..12 {
        assert_eq!(g.chunk(c).unwrap(), contents[c as usize], "chunk {c}");
    }
    assert_eq!(g.frames_read_ahead() > 0, direct);
}

/// Reads ahead that are never taken (their memory went away) do not stop reading ahead:
/// once the caller takes frames asked for after them, they make room.
#[test]
fn reads_never_taken_make_room_for_later_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let direct = takes_direct_io(tmp.path());
    let mut w = GenerationWriter::begin(&tmp.path().join("job"), Compression::None).unwrap();
    let contents: Vec<Vec<u8>> = (0..40u64).map(|k| noise(80 << 10, k + 1)).collect();
    for data in &contents {
        w.pack().add(data).unwrap();
    }
    let (_, dir) = w.finish(&mut manifest(0)).unwrap();
    let mut g = OpenGeneration::open(&dir).unwrap();
    for c in 0..40 {
        g.read_ahead(c);
    }
    for c in 20..40 {
        assert_eq!(g.chunk(c).unwrap(), contents[c as usize], "chunk {c}");
    }
    let read = g.frames_read_ahead();
    assert_eq!(read >= 15, direct, "{read} of 20 frames read ahead");
}

/// A raw frame whose header and index agree on more raw bytes than it stores is damage,
/// reported naming the pack, whether it was read ahead or not.
#[test]
fn a_raw_frame_longer_than_its_stored_bytes_is_damage() {
    let (_tmp, dir, _, _) = write_mixed();
    let man = dir.join(MANIFEST_FILE);
    let mut m = read_manifest(&man).unwrap();
    // Chunk 0: 256 KiB stored raw, read directly when read ahead.
    let f = m.chunks.blobs_of(0)[0].frame as usize;
    m.chunks.frames[f].raw_len += 4096;
    write_manifest(&man, &m).unwrap();
    let frame = m.chunks.frames[f];
    let pack = own_pack(&dir);
    let mut bytes = std::fs::read(&pack).unwrap();
    let at = frame.offset as usize + 8;
    bytes[at..at + 4].copy_from_slice(&frame.raw_len.to_le_bytes());
    std::fs::write(&pack, bytes).unwrap();
    for ahead in [false, true] {
        let mut g = OpenGeneration::open(&dir).unwrap();
        if ahead {
            g.read_ahead(0);
        }
        let err = g.chunk(0).unwrap_err();
        assert!(
            matches!(&err, ImageError::Corrupt { path, .. } if *path == pack),
            "read ahead {ahead}: {err}"
        );
    }
}

/// A generation prepared (pack finished, manifest written and synced) is not in place until
/// finished: no reader lists it, and a writer dropped then leaves neither it nor its pack.
/// Finished, it is the manifest prepared, under the number taken then.
#[test]
fn a_prepared_generation_is_in_place_only_once_finished() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("job");
    let data = noise(4 * 4096, 31);
    let packs = |job: &Path| {
        std::fs::read_dir(job.join(PACKS_DIR))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".pack")
            })
            .count()
    };

    let mut w = GenerationWriter::begin(&job, Compression::FAST).unwrap();
    let c = w.pack().add(&data).unwrap();
    let mut m = manifest(c);
    w.prepare(&mut m).unwrap();
    assert_eq!(m.job.generation, 1);
    assert!(
        list_generations(&job).is_empty(),
        "not in place before finish"
    );
    assert!(w.temp_dir().join(MANIFEST_FILE).is_file());
    drop(w);
    assert!(list_generations(&job).is_empty());
    assert_eq!(packs(&job), 0, "the dropped writer's pack is removed");

    let mut w = GenerationWriter::begin(&job, Compression::FAST).unwrap();
    let c = w.pack().add(&data).unwrap();
    let mut m = manifest(c);
    w.prepare(&mut m).unwrap();
    let (n, dir) = w.finish(&mut m).unwrap();
    assert_eq!((n, list_generations(&job)), (1, vec![1]));
    let read = read_manifest(&dir.join(MANIFEST_FILE)).unwrap();
    assert_eq!(read.job.generation, 1);
    assert_eq!(
        OpenGeneration::open(&dir).unwrap().chunk(c).unwrap(),
        data,
        "the chunk written before prepare reads back"
    );
    assert_eq!(packs(&job), 1);

    // Number 2 taken by another writer between prepare and finish: the next one.
    let mut w = GenerationWriter::begin(&job, Compression::FAST).unwrap();
    let c = w.pack().add(&data).unwrap();
    let mut m = manifest(c);
    w.prepare(&mut m).unwrap();
    assert_eq!(m.job.generation, 2);
    let mut other = GenerationWriter::begin(&job, Compression::FAST).unwrap();
    let c2 = other.pack().add(&data).unwrap();
    assert_eq!(other.finish(&mut manifest(c2)).unwrap().0, 2);
    let (n, dir) = w.finish(&mut m).unwrap();
    assert_eq!((n, list_generations(&job)), (3, vec![1, 2, 3]));
    assert_eq!(
        read_manifest(&dir.join(MANIFEST_FILE))
            .unwrap()
            .job
            .generation,
        3
    );
}

/// An incremental generation lists the blobs it shares as runs, without their content
/// addresses (those lie in the trailer of the pack that holds them): after 1% of 4096 pages
/// changed, its manifest is a small fraction of the 28 bytes per page it took before; both
/// generations read back whole, and the older one can go.
#[test]
fn an_incremental_index_is_about_the_size_of_what_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("job");
    let pages = 4096;
    let data = noise(pages * 4096, 5);
    let mut w = GenerationWriter::begin(&job, Compression::None).unwrap();
    // Stored as a pre-copy does: frames of 256 pages.
    for part in data.chunks(256 * 4096) {
        w.pack().stage(part).unwrap();
    }
    let mut runs = Vec::new();
    for first in (0..pages as u32).step_by(1024) {
        let blobs: Vec<u32> = (first..first + 1024).collect();
        runs.push(w.pack().add_reused(Reused::Staged, &blobs).unwrap());
    }
    let (_, gen1) = w.finish(&mut manifest(runs[0])).unwrap();
    let full_manifest = std::fs::metadata(gen1.join(MANIFEST_FILE)).unwrap().len();
    // 1% of the pages changed, one here and there: each breaks a run of base blobs.
    let mut changed = data.clone();
    let mut w = GenerationWriter::begin(&job, Compression::None).unwrap();
    let mut chunks = Vec::new();
    let mut from = 0u32;
    for k in (0..pages as u32).step_by(100) {
        let page = &mut changed[k as usize * 4096..(k as usize + 1) * 4096];
        page[..8].copy_from_slice(&u64::from(k).to_le_bytes());
        page[8] ^= 0xff;
        if k > from {
            chunks.push(
                w.pack()
                    .add_reused(Reused::Base, &(from..k).collect::<Vec<_>>())
                    .unwrap(),
            );
        }
        chunks.push(w.pack().add(page).unwrap());
        from = k + 1;
    }
    chunks.push(
        w.pack()
            .add_reused(Reused::Base, &(from..pages as u32).collect::<Vec<_>>())
            .unwrap(),
    );
    let (_, gen2) = w.finish(&mut manifest(chunks[0])).unwrap();
    let incremental = std::fs::metadata(gen2.join(MANIFEST_FILE)).unwrap().len();
    let per_page_before = 28 * pages as u64;
    assert!(
        incremental < per_page_before / 4 && full_manifest < per_page_before / 20,
        "manifests: {full_manifest} and {incremental} bytes for {pages} pages"
    );
    let mut g = OpenGeneration::open(&gen2).unwrap();
    let all: Vec<u8> = chunks.iter().flat_map(|&c| g.chunk(c).unwrap()).collect();
    assert!(
        all == changed,
        "the incremental generation reads back as the changed data"
    );
    stasis_image::generation::remove_generation(&job, 1).unwrap();
    stasis_image::generation::collect_garbage(&job).unwrap();
    let v = verify(&gen2).unwrap();
    assert_eq!(v.raw_bytes, data.len() as u64);
}

/// The content addresses of a pack's blobs are checked when a generation is opened: a
/// damaged byte among them, or in the trailer's frame records, is reported with the pack.
#[test]
fn damage_in_a_packs_trailer_names_the_pack() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dir, _) = write_generation(&tmp.path().join("job"));
    let pack = own_pack(&dir);
    let len = std::fs::metadata(&pack).unwrap().len() as usize;
    // The last address, the first frame record (its offset), and the footer's frame count.
    for at in [len - 32 - 3, len - 32 - 16 - 16 * 4, len - 24] {
        flip(&pack, at);
        let err = OpenGeneration::open(&dir).unwrap_err();
        assert!(
            matches!(&err, ImageError::Corrupt { path, what, .. }
                if *path == pack && what.contains("trailer")),
            "byte {at} of {len}: {err}"
        );
        flip(&pack, at);
    }
    OpenGeneration::open(&dir).unwrap();
}

/// Writes `chunks` with `compression` into a new generation of `job`; returns its
/// directory and manifest.
fn write_chunks(
    job: &Path,
    compression: Compression,
    chunks: &[Vec<u8>],
) -> (std::path::PathBuf, Manifest) {
    let mut w = GenerationWriter::begin(job, compression).unwrap();
    for (i, data) in chunks.iter().enumerate() {
        assert_eq!(w.pack().add(data).unwrap() as usize, i);
    }
    let (_, dir) = w.finish(&mut manifest(0)).unwrap();
    let m = read_manifest(&dir.join(MANIFEST_FILE)).unwrap();
    (dir, m)
}

/// Compressible chunks (4-bit values: no repeats, but half their bits are zero) alternating
/// with noise, each chunk 256 KiB of distinct pages.
fn alternating(n: u64) -> Vec<Vec<u8>> {
    (0..n)
        .map(|k| match k % 2 {
            0 => noise(256 << 10, k + 100).iter().map(|b| b & 0x0f).collect(),
            _ => noise(256 << 10, k + 100),
        })
        .collect()
}

/// The pack's frames, by offset, do not overlap and lie between its header and trailer;
/// every chunk reads back as written and the generation verifies.
fn check_frames_and_contents(dir: &Path, m: &Manifest, chunks: &[Vec<u8>]) {
    let mut frames = m.chunks.frames.clone();
    frames.sort_by_key(|f| f.offset);
    let mut end = 16;
    for f in &frames {
        assert!(f.offset >= end, "frames overlap: {frames:?}");
        if !f.zstd {
            assert_eq!(
                f.stored_len, f.raw_len,
                "a raw frame stores its bytes: {f:?}"
            );
        }
        end = f.offset + 16 + u64::from(f.stored_len);
    }
    let mut g = OpenGeneration::open(dir).unwrap();
    for (c, data) in chunks.iter().enumerate() {
        assert_eq!(&g.chunk(c as u32).unwrap(), data, "chunk {c}");
    }
    let v = verify(dir).unwrap();
    assert_eq!(v.chunks, chunks.len(), "{v:?}");
}

/// Every mode stores what it was given. `small` waits for the compressor: every
/// compressible frame is compressed, no noise frame is. `none` compresses nothing. `fast`
/// hands the first frames to the compression thread (the first two are always taken) and
/// places frames as they come back, in whatever order that is.
#[test]
fn compression_modes_store_frames_as_compression_pays() {
    let tmp = tempfile::tempdir().unwrap();
    let chunks = alternating(24);
    let compressed = |m: &Manifest, c: u32| frame_of(m, c).zstd;

    let (dir, m) = write_chunks(&tmp.path().join("small"), Compression::SMALL, &chunks);
    check_frames_and_contents(&dir, &m, &chunks);
    for c in 0..24u32 {
        // Noise never pays, so probes are spaced: compressible frames keep paying and
        // reset the spacing before it skips any.
        assert_eq!(compressed(&m, c), c % 2 == 0, "small, chunk {c}");
    }
    let small = verify(&dir).unwrap().stored_bytes;

    let (dir, m) = write_chunks(&tmp.path().join("none"), Compression::None, &chunks);
    check_frames_and_contents(&dir, &m, &chunks);
    assert!((0..24).all(|c| !compressed(&m, c)));
    let none = verify(&dir).unwrap().stored_bytes;
    assert!(small < none * 4 / 5, "small {small}, none {none}");

    let (dir, m) = write_chunks(&tmp.path().join("fast"), Compression::FAST, &chunks);
    check_frames_and_contents(&dir, &m, &chunks);
    assert!(
        compressed(&m, 0),
        "the first frame goes to the compression thread"
    );
    assert!((0..24).filter(|c| c % 2 == 1).all(|c| !compressed(&m, c)));

    // Small frames (8 KiB) are compressed by the writer itself, each as it pays (96 KiB of
    // them tried: too few to judge their speed by, which a megabyte decides).
    let chunks: Vec<Vec<u8>> = (0..24u64)
        .map(|k| match k % 2 {
            0 => format!("chunk {k} of text that repeats itself; ")
                .repeat(300)
                .into_bytes()[..8192]
                .to_vec(),
            _ => noise(8192, k + 100),
        })
        .collect();
    let (dir, m) = write_chunks(&tmp.path().join("fast-small"), Compression::FAST, &chunks);
    check_frames_and_contents(&dir, &m, &chunks);
    for c in 0..24u32 {
        assert_eq!(compressed(&m, c), c % 2 == 0, "fast, small chunk {c}");
    }
}

/// A writer dropped before it finished (a checkpoint that failed) with frames at the
/// compression thread leaves the thread to the next writer, which compresses as before.
#[test]
fn a_writer_dropped_with_frames_under_way_leaves_the_compressor_working() {
    let tmp = tempfile::tempdir().unwrap();
    let chunks = alternating(8);
    for round in 0..3 {
        let mut w =
            GenerationWriter::begin(&tmp.path().join("dropped"), Compression::SMALL).unwrap();
        for data in &chunks {
            w.pack().add(data).unwrap();
        }
        drop(w);
        let (dir, m) = write_chunks(
            &tmp.path().join(format!("after{round}")),
            Compression::SMALL,
            &chunks,
        );
        check_frames_and_contents(&dir, &m, &chunks);
        assert!(
            frame_of(&m, 0).zstd && frame_of(&m, 6).zstd,
            "round {round}"
        );
    }
}
