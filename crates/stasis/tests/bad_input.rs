//! Bad input: damaged, truncated, foreign or crafted images, files changed behind a stopped
//! job's back, images from another machine, missing jobs and generations, and a checkpoint
//! that cannot be written. Every case must end in a clear error (non-zero exit, the file and
//! offset named where the format has them), never a panic and never a wrongly restored
//! process.

mod common;

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use common::{EXIT_CHECKPOINTED, Env, assert_all_pass, program};
use stasis_image::generation::{read_manifest, write_manifest};

const DATA_LEN: usize = 65536;

/// The byte pattern `reader.c` checks.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 7 + i / 251) & 0xff) as u8).collect()
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Runs `stasis ARGS` (stdout and stderr to files, at most 30 s) and asserts a clean failure:
/// exit status 1 (not 0, not a panic's 101), no `panicked` in the output. Returns
/// stderr + stdout.
fn fails_clean(env: &Env, args: &[&str]) -> String {
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    let out = env.work.join(format!("cmd-{n}.stdout"));
    let err = env.work.join(format!("cmd-{n}.stderr"));
    let mut child = env
        .cmd()
        .args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawn stasis");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            if args.first() == Some(&"restart") {
                let _ = env.stasis(&["kill", args[1]]);
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "stasis {args:?} did not fail: it was still running after 30 s (a job was restored from a bad image?)\nstderr: {}",
                fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = format!(
        "{}{}",
        fs::read_to_string(&err).unwrap_or_default(),
        fs::read_to_string(&out).unwrap_or_default()
    );
    assert!(
        !text.contains("panicked"),
        "stasis {args:?} panicked instead of reporting an error:\n{text}"
    );
    assert_eq!(
        status.code(),
        Some(1),
        "stasis {args:?} should fail with an error (exit 1), got {status:?}:\n{text}"
    );
    text
}

fn assert_mentions(text: &str, needles: &[&str]) {
    for n in needles {
        assert!(
            text.contains(n),
            "error message should mention {n:?}:\n{text}"
        );
    }
}

/// A stopped job: the reader program checkpointed with `--kill` right after READY.
struct Stopped {
    name: String,
    job: common::Job,
    data: PathBuf,
    map: PathBuf,
}

/// Starts `reader` on a fresh 64 KiB data file (and an 8 KiB mapped file when `with_map`),
/// waits for READY and takes `checkpoint --kill`.
fn stopped_reader(env: &Env, prefix: &str, with_map: bool) -> Stopped {
    let name = env.name(prefix);
    let data = env.work.join(format!("{name}.data"));
    let map = env.work.join(format!("{name}.map"));
    fs::write(&data, pattern(DATA_LEN)).unwrap();
    fs::write(&map, pattern(8192)).unwrap();
    let prog = program("reader", false);
    let mut args = vec![env.work.to_str().unwrap(), data.to_str().unwrap()];
    if with_map {
        args.push(map.to_str().unwrap());
    }
    let mut job = env.start(&name, &prog, &args);
    env.wait_output(&job, "READY\n");
    let r = env.checkpoint(&name, true);
    assert_eq!(r["generation"], 1);
    assert_eq!(job.wait(), EXIT_CHECKPOINTED, "{}", env.stderr(&job));
    Stopped {
        name,
        job,
        data,
        map,
    }
}

fn copy_dir(from: &Path, to: &Path) {
    fs::DirBuilder::new().mode(0o700).create(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            fs::copy(e.path(), &dest).unwrap();
        }
    }
}

/// Copies job `from`'s images to a new job name; returns the name and its gen-0001 directory.
fn clone_job(env: &Env, from: &str, prefix: &str) -> (String, PathBuf) {
    let name = env.name(prefix);
    copy_dir(&env.job_dir(from), &env.job_dir(&name));
    let gen1 = env.job_dir(&name).join("gen-0001");
    (name, gen1)
}

/// The pack file generation `generation` wrote, and its name.
fn own_pack(generation: &Path) -> (PathBuf, String) {
    let m = read_manifest(&generation.join("manifest")).unwrap();
    let name = m.packs[0].clone();
    (generation.parent().unwrap().join("packs").join(&name), name)
}

fn patch(path: &Path, offset: usize, bytes: &[u8]) {
    let mut b = fs::read(path).unwrap();
    b[offset..offset + bytes.len()].copy_from_slice(bytes);
    fs::write(path, b).unwrap();
}

fn truncate(path: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

#[test]
fn flipped_bit_in_a_pack_chunk_is_detected() {
    let env = Env::new();
    let s = stopped_reader(&env, "flip", false);
    let (bad, gen1) = clone_job(&env, &s.name, "flipped");
    let m = read_manifest(&gen1.join("manifest")).unwrap();
    // A chunk holding memory the restorer must load.
    let index = m.processes[0]
        .vmas
        .iter()
        .flat_map(|v| v.pages.iter())
        .map(|r| r.chunk as usize)
        .next()
        .expect("the image holds memory pages");
    let frame = m.chunks.frames[m.chunks.blobs_of(index as u32)[0].frame as usize];
    let (pack, pack_name) = own_pack(&gen1);
    let at = (frame.offset + 16 + u64::from(frame.stored_len) / 2) as usize;
    let mut bytes = fs::read(&pack).unwrap();
    bytes[at] ^= 0x10;
    fs::write(&pack, bytes).unwrap();
    let offset = format!("offset {}", frame.offset);

    let text = fails_clean(&env, &["verify", gen1.to_str().unwrap()]);
    assert_mentions(&text, &[pack.to_str().unwrap(), &offset]);
    let text = fails_clean(&env, &["--json", "verify", gen1.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(text.trim()).expect("JSON error report");
    let e = v["error"].as_str().expect("error field");
    assert!(e.contains(&pack_name) && e.contains(&offset), "{e}");
    let text = fails_clean(&env, &["restart", &bad]);
    assert_mentions(&text, &[&pack_name, &offset]);

    // The undamaged original still verifies and restarts into a correct program.
    env.ok(&["verify", env.job_dir(&s.name).to_str().unwrap()]);
    let mut restarted = env.restart(&s.job, &[]);
    env.go();
    assert_eq!(restarted.wait(), 0, "{}", env.stderr(&restarted));
    assert_all_pass(&env.output(&restarted));
}

#[test]
fn truncated_pack_is_detected() {
    let env = Env::new();
    let s = stopped_reader(&env, "trpack", false);
    // Cut in the middle of the chunks.
    let (bad, gen1) = clone_job(&env, &s.name, "trpack-half");
    let (pack, pack_name) = own_pack(&gen1);
    let half = fs::metadata(&pack).unwrap().len() / 2;
    truncate(&pack, half);
    let text = fails_clean(&env, &["verify", gen1.to_str().unwrap()]);
    assert_mentions(
        &text,
        &[
            pack.to_str().unwrap(),
            "truncated",
            &format!("ends at byte {half}"),
        ],
    );
    let text = fails_clean(&env, &["restart", &bad]);
    assert_mentions(&text, &[&pack_name, "truncated"]);
    // Cut inside the header.
    let (bad, gen1) = clone_job(&env, &s.name, "trpack-head");
    let (pack, pack_name) = own_pack(&gen1);
    truncate(&pack, 10);
    let text = fails_clean(&env, &["verify", gen1.to_str().unwrap()]);
    assert_mentions(&text, &[pack.to_str().unwrap(), "truncated at offset 10"]);
    let text = fails_clean(&env, &["restart", &bad]);
    assert_mentions(&text, &[&pack_name, "truncated at offset 10"]);
}

#[test]
fn truncated_manifest_is_detected() {
    let env = Env::new();
    let s = stopped_reader(&env, "trman", false);
    for cut in [100u64, 12] {
        let (bad, gen1) = clone_job(&env, &s.name, "trman");
        let manifest = gen1.join("manifest");
        truncate(&manifest, cut);
        for verb in ["verify", "inspect"] {
            let text = fails_clean(&env, &[verb, gen1.to_str().unwrap()]);
            assert_mentions(
                &text,
                &[
                    manifest.to_str().unwrap(),
                    &format!("truncated at offset {cut}"),
                ],
            );
        }
        let text = fails_clean(&env, &["restart", &bad]);
        assert_mentions(&text, &["manifest", "truncated"]);
    }
}

#[test]
fn other_format_version_is_refused() {
    let env = Env::new();
    let s = stopped_reader(&env, "version", false);
    let (bad, gen1) = clone_job(&env, &s.name, "version-m");
    let manifest = gen1.join("manifest");
    patch(&manifest, 8, &9u32.to_le_bytes());
    for verb in ["verify", "inspect"] {
        let text = fails_clean(&env, &[verb, gen1.to_str().unwrap()]);
        assert_mentions(
            &text,
            &[manifest.to_str().unwrap(), "version 9 is not supported"],
        );
    }
    let text = fails_clean(&env, &["restart", &bad]);
    assert_mentions(&text, &["manifest", "version 9 is not supported"]);

    let (bad, gen1) = clone_job(&env, &s.name, "version-p");
    let (pack, pack_name) = own_pack(&gen1);
    patch(&pack, 8, &7u32.to_le_bytes());
    let text = fails_clean(&env, &["verify", gen1.to_str().unwrap()]);
    assert_mentions(
        &text,
        &[pack.to_str().unwrap(), "version 7 is not supported"],
    );
    let text = fails_clean(&env, &["restart", &bad]);
    assert_mentions(&text, &[&pack_name, "version 7 is not supported"]);
}

#[test]
fn manifest_checksum_mismatch_is_detected() {
    let env = Env::new();
    let s = stopped_reader(&env, "crc", false);
    let (bad, gen1) = clone_job(&env, &s.name, "crc");
    let manifest = gen1.join("manifest");
    let mut b = fs::read(&manifest).unwrap();
    let mid = 24 + (b.len() - 24) / 2;
    b[mid] ^= 0x01;
    fs::write(&manifest, b).unwrap();
    for verb in ["verify", "inspect"] {
        let text = fails_clean(&env, &[verb, gen1.to_str().unwrap()]);
        assert_mentions(
            &text,
            &[manifest.to_str().unwrap(), "checksum mismatch at offset 24"],
        );
    }
    let text = fails_clean(&env, &["restart", &bad]);
    assert_mentions(&text, &["manifest", "checksum mismatch"]);
}

#[test]
fn manifest_with_valid_checksum_but_invalid_contents_is_refused() {
    let env = Env::new();
    let s = stopped_reader(&env, "invalid", false);
    type Edit = fn(&mut stasis_image::Manifest);
    let edits: [(&str, Edit, &str); 3] = [
        (
            "page run naming a chunk out of range",
            |m| {
                let n = m.chunks.len() as u32;
                let v = m.processes[0]
                    .vmas
                    .iter_mut()
                    .find(|v| !v.pages.is_empty())
                    .unwrap();
                v.pages[0].chunk = n + 5;
            },
            "names chunk",
        ),
        (
            "mapping not page-aligned",
            |m| m.processes[0].vmas[0].start += 1,
            "bad mapping",
        ),
        (
            "descriptor naming a missing open file",
            |m| {
                let n = m.files.len() as u32;
                m.processes[0].fds[0].file = n + 3;
            },
            "names file",
        ),
    ];
    for (what, edit, needle) in edits {
        let (bad, gen1) = clone_job(&env, &s.name, "invalid");
        let manifest = gen1.join("manifest");
        let mut m = read_manifest(&manifest).unwrap();
        edit(&mut m);
        write_manifest(&manifest, &m).unwrap();
        for verb in ["verify", "inspect"] {
            let text = fails_clean(&env, &[verb, gen1.to_str().unwrap()]);
            assert!(
                text.contains(manifest.to_str().unwrap())
                    && text.contains("invalid manifest")
                    && text.contains(needle),
                "{what}: `{verb}` should say invalid manifest ({needle}):\n{text}"
            );
        }
        let text = fails_clean(&env, &["restart", &bad]);
        assert!(
            text.contains("invalid manifest") && text.contains(needle),
            "{what}: restart should say invalid manifest:\n{text}"
        );
    }
}

#[test]
fn malformed_signal_record_is_refused_without_a_crash() {
    // A manifest with a valid checksum whose pending-signal record is 2 bytes long instead
    // of a 128-byte siginfo: the restorer must refuse it, not crash on it.
    let env = Env::new();
    let s = stopped_reader(&env, "siginfo", false);
    for per_thread in [false, true] {
        let (bad, gen1) = clone_job(&env, &s.name, "siginfo");
        let manifest = gen1.join("manifest");
        let mut m = read_manifest(&manifest).unwrap();
        if per_thread {
            m.processes[0].threads[0].pending = vec![vec![10, 0]];
        } else {
            m.processes[0].shared_pending = vec![vec![10, 0]];
        }
        write_manifest(&manifest, &m).unwrap();
        let text = fails_clean(&env, &["restart", &bad]);
        assert!(
            text.contains("manifest") || text.contains("signal"),
            "the error should point at the bad signal record:\n{text}"
        );
    }
}

#[test]
fn not_an_image_is_refused() {
    let env = Env::new();
    let empty = env.work.join("empty");
    fs::create_dir(&empty).unwrap();
    for verb in ["verify", "inspect"] {
        let text = fails_clean(&env, &[verb, empty.to_str().unwrap()]);
        assert_mentions(&text, &[empty.to_str().unwrap(), "no such generation"]);
        let missing = env.work.join("does-not-exist");
        let text = fails_clean(&env, &[verb, missing.to_str().unwrap()]);
        assert_mentions(&text, &[missing.to_str().unwrap()]);
        let file = env.work.join("plain-file");
        fs::write(&file, b"hello").unwrap();
        let text = fails_clean(&env, &[verb, file.to_str().unwrap()]);
        assert_mentions(&text, &[file.to_str().unwrap()]);
    }
    // A generation directory whose manifest is something else.
    let junk = env.work.join("junk/gen-0001");
    fs::create_dir_all(&junk).unwrap();
    fs::write(junk.join("manifest"), vec![b'x'; 4096]).unwrap();
    fs::write(junk.join("pages.pack"), vec![b'y'; 4096]).unwrap();
    for verb in ["verify", "inspect"] {
        let text = fails_clean(&env, &[verb, junk.to_str().unwrap()]);
        assert_mentions(
            &text,
            &[
                junk.join("manifest").to_str().unwrap(),
                "bad magic at offset 0",
            ],
        );
    }
    // The same as a job's newest generation.
    let name = env.name("junk");
    let job_gen = env.job_dir(&name).join("gen-0001");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&job_gen)
        .unwrap();
    fs::write(job_gen.join("manifest"), vec![b'x'; 4096]).unwrap();
    let text = fails_clean(&env, &["restart", &name]);
    assert_mentions(
        &text,
        &[job_gen.join("manifest").to_str().unwrap(), "bad magic"],
    );
    // A generation directory with a good manifest but no pack.
    let s = stopped_reader(&env, "nopack", false);
    let (bad, gen1) = clone_job(&env, &s.name, "nopack");
    let (pack, pack_name) = own_pack(&gen1);
    fs::remove_file(&pack).unwrap();
    let text = fails_clean(&env, &["verify", gen1.to_str().unwrap()]);
    assert_mentions(&text, &[pack.to_str().unwrap()]);
    let text = fails_clean(&env, &["restart", &bad]);
    assert_mentions(&text, &[&pack_name]);
}

#[test]
fn changed_or_missing_files_refuse_restart_unless_forced() {
    let env = Env::new();
    let s = stopped_reader(&env, "files", true);
    let data = s.data.to_str().unwrap().to_owned();
    let map = s.map.to_str().unwrap().to_owned();

    // The mapped file is gone.
    let aside = env.work.join("map.aside");
    fs::rename(&s.map, &aside).unwrap();
    let text = fails_clean(&env, &["restart", &s.name]);
    assert_mentions(&text, &[&map]);
    fs::rename(&aside, &s.map).unwrap();

    // The data file (open for reading) was deleted.
    let mtime = fs::metadata(&s.data).unwrap().modified().unwrap();
    fs::remove_file(&s.data).unwrap();
    let text = fails_clean(&env, &["restart", &s.name]);
    assert_mentions(&text, &[&data, "--force"]);
    // Deleted, then written again with the same bytes and mtime: that is the same file.
    fs::write(&s.data, pattern(DATA_LEN)).unwrap();
    set_mtime(&s.data, mtime);

    // Same size and mtime, one byte changed (a small file: checked by content; a changed
    // mtime alone is accepted, see tests/files.rs).
    let mut other = pattern(DATA_LEN);
    other[DATA_LEN - 1] ^= 0xff;
    fs::write(&s.data, other).unwrap();
    set_mtime(&s.data, mtime);
    let text = fails_clean(&env, &["restart", &s.name]);
    assert_mentions(&text, &[&data, "content differs"]);

    // One byte appended: other size.
    let mut more = pattern(DATA_LEN);
    more.push(0xaa);
    fs::write(&s.data, more).unwrap();
    let text = fails_clean(&env, &["restart", &s.name]);
    assert_mentions(&text, &[&data, &format!("{DATA_LEN} -> {}", DATA_LEN + 1)]);

    // --force restores anyway; the program reads on from its saved offset.
    let mut restarted = env.restart(&s.job, &["--force"]);
    env.go();
    assert_eq!(restarted.wait(), 0, "{}", env.stderr(&restarted));
    let out = env.output(&restarted);
    assert!(out.contains("resumed\n"), "{out}");
    assert_all_pass(&out);
}

fn set_mtime(path: &Path, t: SystemTime) {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

#[test]
fn image_from_another_kernel_is_refused() {
    let env = Env::new();
    let s = stopped_reader(&env, "vdso", false);
    let (bad, gen1) = clone_job(&env, &s.name, "vdso");
    let manifest = gen1.join("manifest");
    let mut m = read_manifest(&manifest).unwrap();
    assert_eq!(m.job.vdso_blake3.len(), 64, "vdso hash is recorded");
    m.job.vdso_blake3 = "ab".repeat(32);
    write_manifest(&manifest, &m).unwrap();
    let text = fails_clean(&env, &["restart", &bad]);
    assert_mentions(&text, &["vdso", "kernel"]);
}

#[test]
fn image_needing_missing_cpu_features_is_refused() {
    let env = Env::new();
    let s = stopped_reader(&env, "xcr0", false);
    let (bad, gen1) = clone_job(&env, &s.name, "xcr0");
    let manifest = gen1.join("manifest");
    let mut m = read_manifest(&manifest).unwrap();
    let xs = &mut m.processes[0].threads[0].xstate;
    assert!(
        xs.len() >= 576,
        "an XSAVE area was saved ({} bytes)",
        xs.len()
    );
    // In the XSAVE area ptrace returns (NT_X86_XSTATE), the software-reserved bytes 464..512
    // hold the XCR0 feature mask in their first word (the kernel's USER_XSTATE_XCR0_WORD;
    // gdb's I386_LINUX_XSAVE_XCR0_OFFSET = 464). The signal-frame layout would put a magic
    // at 464 and the mask at 472. Claim features no x86 CPU offers today in both places.
    let xcr0 = u64::from_le_bytes(xs[464..472].try_into().unwrap());
    assert!(
        xcr0 & 3 == 3,
        "the saved XCR0 word ({xcr0:#x}) has at least x87 and SSE"
    );
    for at in [464, 472] {
        let mut mask = u64::from_le_bytes(xs[at..at + 8].try_into().unwrap());
        mask |= 0x3f << 56;
        xs[at..at + 8].copy_from_slice(&mask.to_le_bytes());
    }
    write_manifest(&manifest, &m).unwrap();
    // Should the restart wrongly go ahead, the program finishes at once instead of waiting.
    env.go();
    let text = fails_clean(&env, &["restart", &bad]);
    assert_mentions(&text, &["CPU", "features"]);
}

#[test]
fn missing_job_or_generation_is_a_clear_error() {
    let env = Env::new();
    let nosuch = env.name("nosuch");
    let text = fails_clean(&env, &["restart", &nosuch]);
    assert_mentions(&text, &[&nosuch, "no such generation"]);
    let s = stopped_reader(&env, "gens", false);
    let text = fails_clean(&env, &["restart", &s.name, "--generation", "9"]);
    assert_mentions(&text, &[&s.name, "generation 9 not found", "[1]"]);
    let text = fails_clean(&env, &["restart", &s.name, "--generation", "0"]);
    assert_mentions(&text, &["generation 0 not found"]);
    for verb in ["checkpoint", "status", "kill"] {
        let text = fails_clean(&env, &[verb, &nosuch]);
        assert_mentions(&text, &[&nosuch, "no running job"]);
    }
}

fn ticks(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .collect()
}

#[test]
fn an_older_generation_can_be_restarted() {
    let env = Env::new();
    let name = env.name("older");
    let prog = program("counter", false);
    let mut job = env.start(&name, &prog, &[env.work.to_str().unwrap(), "150"]);
    env.wait_output(&job, "tick 10\n");
    assert_eq!(env.checkpoint(&name, false)["generation"], 1);
    env.wait_output(&job, "tick 40\n");
    assert_eq!(env.checkpoint(&name, true)["generation"], 2);
    assert_eq!(job.wait(), EXIT_CHECKPOINTED);
    let original = env.output(&job);
    let at_kill = *ticks(&original).last().unwrap();
    // A fresh, empty output file: the program writes at its saved offset, so what lands
    // before it (a hole of zero bytes) shows where the restored program stood.
    fs::remove_file(&job.out).unwrap();
    fs::File::create(&job.out).unwrap();
    let mut restarted = env.restart(&job, &["--generation", "1"]);
    assert_eq!(restarted.wait(), 0, "{}", env.stderr(&restarted));
    let after = fs::read(&job.out).unwrap();
    let hole = after.iter().take_while(|&&b| b == 0).count();
    assert!(hole > 0 && hole < original.len(), "hole of {hole} bytes");
    assert_eq!(
        original.as_bytes()[hole - 1],
        b'\n',
        "generation 1 was taken between two lines"
    );
    let at_gen1 = ticks(&original[..hole]).len() as u64;
    assert!(
        at_gen1 >= 10 && at_gen1 < at_kill,
        "generation 1 ({at_gen1} ticks) is older than generation 2 ({at_kill} ticks)"
    );
    let rest = String::from_utf8(after[hole..].to_vec()).unwrap();
    assert_eq!(
        ticks(&rest),
        (at_gen1 + 1..=150).collect::<Vec<_>>(),
        "the program resumed right after generation 1's point"
    );
    assert_all_pass(&rest);
    let status_after = env.ok(&["--json", "inspect", env.job_dir(&name).to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(status_after.trim()).unwrap();
    assert_eq!(v["job"]["generation"], 2, "no generation was added or lost");
}

#[test]
fn failed_checkpoint_leaves_the_job_running() {
    let env = Env::new();
    let name = env.name("ckfail");
    let data = env.work.join("data");
    fs::write(&data, pattern(DATA_LEN)).unwrap();
    let prog = program("reader", false);
    let mut job = env.start(
        &name,
        &prog,
        &[env.work.to_str().unwrap(), data.to_str().unwrap()],
    );
    env.wait_output(&job, "READY\n");
    assert_eq!(env.checkpoint(&name, false)["generation"], 1);
    let status = |env: &Env| -> serde_json::Value {
        serde_json::from_str(env.ok(&["--json", "status", &name]).trim()).unwrap()
    };
    let pid = status(&env)["pid"].as_i64().unwrap();

    // The job's image directory is replaced by a regular file.
    let dir = env.job_dir(&name);
    let aside = env.images.join("moved-aside");
    fs::rename(&dir, &aside).unwrap();
    fs::write(&dir, b"not a directory").unwrap();
    for kill in [false, true] {
        let mut args = vec!["checkpoint", name.as_str()];
        if kill {
            args.push("--kill");
        }
        let text = fails_clean(&env, &args);
        assert_mentions(&text, &[dir.to_str().unwrap(), "failed"]);
        let st = status(&env);
        assert_eq!(st["state"], "running", "{st}");
        assert_eq!(st["pid"].as_i64().unwrap(), pid);
        let threads = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(
            threads
                .lines()
                .any(|l| l.starts_with("State:") && !l.contains("t (tracing stop)")),
            "the job is not left frozen:\n{threads}"
        );
    }
    assert!(
        job.child.try_wait().unwrap().is_none(),
        "the job runs on after failed checkpoints"
    );
    fs::remove_file(&dir).unwrap();
    fs::rename(&aside, &dir).unwrap();
    env.ok(&["verify", dir.join("gen-0001").to_str().unwrap()]);
    assert_eq!(env.checkpoint(&name, false)["generation"], 2);
    env.ok(&["verify", dir.join("gen-0002").to_str().unwrap()]);
    env.ok(&["verify", dir.join("gen-0001").to_str().unwrap()]);
    let leftovers: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary directories left: {leftovers:?}"
    );
    env.go();
    assert_eq!(job.wait(), 0, "{}", env.stderr(&job));
    assert_all_pass(&env.output(&job));
    // The mode of what we created above stays private.
    assert_eq!(
        fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
}

/// Runs `b_signals` (real-time signals queued and counted without pause) through `rounds`
/// checkpoints, failing ones when `fail` (the job's image directory replaced by a file);
/// the program must then count every signal delivered.
fn signals_through_checkpoints(fail: bool, rounds: u32) {
    let env = Env::new();
    let name = env.name(if fail { "sigfail" } else { "sigok" });
    let prog = program("b_signals", false);
    let mut job = env.start(&name, &prog, &[env.work.to_str().unwrap()]);
    env.wait_output(&job, "READY\n");
    let dir = env.job_dir(&name);
    if fail {
        // `stasis run` made the (empty) directory: a regular file takes its place.
        fs::remove_dir(&dir).unwrap();
        fs::write(&dir, b"not a directory").unwrap();
    }
    for round in 0..rounds {
        if fail {
            let text = fails_clean(&env, &["checkpoint", &name]);
            assert_mentions(&text, &[dir.to_str().unwrap()]);
        } else {
            assert_eq!(env.checkpoint(&name, false)["generation"], round + 1);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    env.go();
    assert_eq!(job.wait(), 0, "{}\n{}", env.output(&job), env.stderr(&job));
    assert_all_pass(&env.output(&job));
}

#[test]
fn failed_checkpoints_lose_no_signal() {
    signals_through_checkpoints(true, 100);
}

#[test]
fn checkpoints_lose_no_signal() {
    signals_through_checkpoints(false, 50);
}
