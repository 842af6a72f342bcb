//! Write tracking between checkpoints: a checkpoint reads only the pages written since the
//! generation it builds on, and references the rest. These tests change memory in every
//! way tracking must notice (t_dirty.c: writes, `MADV_DONTNEED`, `mremap`, mappings
//! replaced, a forked child's writes, a partial page) and restart from the incremental
//! generations: the program finds every page as it was. They also check when tracking must
//! not be trusted: after a restart from an older generation, when the base generation is damaged, after a failed
//! checkpoint, and with `--no-write-tracking`.

mod common;

use std::fs;
use std::path::Path;

use common::{EXIT_CHECKPOINTED, Env, Job, assert_all_pass, program};
use serde_json::Value;

/// Pages of t_dirty's region A.
const REGION_PAGES: u64 = 2048;

fn unchanged_pages(report: &Value) -> u64 {
    report["unchanged_bytes"].as_u64().expect("unchanged_bytes") / 4096
}

/// Makes t_dirty take step `k` and waits until it has.
fn step(env: &Env, job: &Job, k: u32) {
    fs::write(env.work.join(format!("step{k}")), b"").expect("step file");
    env.wait_output(job, &format!("STEP {k}\n"));
}

/// A checkpoint after a step of a few percent of the pages knows most of region A unchanged.
fn assert_mostly_unchanged(report: &Value) {
    let n = unchanged_pages(report);
    assert!(
        n >= REGION_PAGES * 9 / 10,
        "{n} pages known unchanged, want at least 90% of {REGION_PAGES}: {report}"
    );
}

fn assert_none_unchanged(report: &Value, why: &str) {
    assert_eq!(unchanged_pages(report), 0, "{why}: {report}");
}

fn start_dirty(env: &Env, name: &str, flags: &[&str]) -> Job {
    let job = env.start_with(name, flags, &program("t_dirty", false), &[&env.work]);
    env.wait_output(&job, "READY\n");
    job
}

/// No step was taken twice: a restarted program whose stack came back stale would find
/// itself before a step it had already taken, and take it again.
fn assert_steps_once(out: &str) {
    let steps: Vec<&str> = out.lines().filter(|l| l.starts_with("STEP ")).collect();
    let unique: std::collections::HashSet<&&str> = steps.iter().collect();
    assert_eq!(unique.len(), steps.len(), "a step was taken twice:\n{out}");
}

/// Restarts the newest generation, lets the program check itself, asserts it passes.
fn restart_and_check(env: &Env, job: &Job) {
    let mut restarted = env.restart(job, &[]);
    env.go();
    assert_eq!(
        restarted.wait(),
        0,
        "output:\n{}\nstderr:\n{}",
        env.output(job),
        env.stderr(job)
    );
    assert_all_pass(&env.output(job));
    assert_steps_once(&env.output(job));
}

#[test]
fn pages_changed_every_way_between_checkpoints_restart_exactly() {
    let env = Env::new();
    let name = env.name("dirty");
    let mut job = start_dirty(&env, &name, &[]);
    assert_none_unchanged(&env.checkpoint(&name, false), "the first checkpoint");
    for k in 1..=3 {
        step(&env, &job, k);
        assert_mostly_unchanged(&env.checkpoint(&name, k == 3));
    }
    assert_eq!(job.wait(), EXIT_CHECKPOINTED);

    // The restart protects the memory it restored (a lazy one as it loads it): the first
    // checkpoint after it, which builds on the generation restored, reads only what the job
    // wrote since.
    let mut restarted = env.restart(&job, &[]);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_mostly_unchanged(&env.checkpoint(&name, false));
    step(&env, &restarted, 4);
    assert_mostly_unchanged(&env.checkpoint(&name, false));
    env.go();
    assert_eq!(
        restarted.wait(),
        0,
        "output:\n{}\nstderr:\n{}",
        env.output(&job),
        env.stderr(&job)
    );
    assert_all_pass(&env.output(&job));
    assert_steps_once(&env.output(&job));

    // Once more from the newest generation, written incrementally by the restarted job.
    fs::write(&job.out, b"").expect("truncate output");
    env.ungo();
    restart_and_check(&env, &job);

    // From an older generation: the next checkpoint builds on the newest, not on the one
    // restored, so it must read everything.
    fs::write(&job.out, b"").expect("truncate output");
    env.ungo();
    for k in 2..=4 {
        let _ = fs::remove_file(env.work.join(format!("step{k}")));
    }
    let mut old = env.restart(&job, &["--generation", "2"]);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_none_unchanged(
        &env.checkpoint(&name, false),
        "a restart from an older generation",
    );
    env.go();
    assert_eq!(old.wait(), 0, "{}", env.stderr(&job));
    assert_all_pass(&env.output(&job));
}

/// Bytes a checkpoint copied while the job was frozen (instead of forking a snapshot).
fn copied_bytes(report: &Value) -> u64 {
    report["copied_bytes"].as_u64().expect("copied_bytes")
}

fn precopied_pages(report: &Value) -> u64 {
    report["precopied_bytes"].as_u64().expect("precopied_bytes") / 4096
}

/// A checkpoint that lets the job run on, with few pages written since the one it builds
/// on, copies them while the job is frozen instead of forking a copy-on-write snapshot.
/// The next checkpoint still sees every page written after the copy, and the program
/// restarted from it finds every page as it wrote it (t_dirty with 16384 pages: its steps
/// from 4 on write 1% of them each).
#[test]
fn few_changed_pages_are_copied_at_the_cut_and_later_writes_are_seen() {
    let env = Env::new();
    let name = env.name("dirtycopy");
    let mut job = env.start(
        &name,
        &program("t_dirty", false),
        &[env.work.to_str().unwrap(), "16384"],
    );
    env.wait_output(&job, "READY\n");
    // The first checkpoint of a process this large reads its memory before the cut (a
    // pre-copy): nothing is known unchanged since an earlier generation.
    let first = env.checkpoint(&name, false);
    assert_eq!(unchanged_pages(&first), 0, "{first}");
    assert!(precopied_pages(&first) >= 16384 * 9 / 10, "{first}");
    for k in 1..=4 {
        step(&env, &job, k);
        let report = env.checkpoint(&name, false);
        assert!(unchanged_pages(&report) >= 16384 * 9 / 10, "{report}");
        if k == 4 {
            assert!(
                copied_bytes(&report) >= 163 * 4096,
                "1% of the pages copied: {report}"
            );
        }
    }
    // Steps 5 and 6 write 2%: read from a snapshot, the rest known unchanged since the
    // cut whose pages were copied; then step 7's 1% copied again.
    step(&env, &job, 5);
    step(&env, &job, 6);
    let report = env.checkpoint(&name, false);
    assert!(unchanged_pages(&report) >= 16384 * 9 / 10, "{report}");
    step(&env, &job, 7);
    let report = env.checkpoint(&name, false);
    assert!(unchanged_pages(&report) >= 16384 * 9 / 10, "{report}");
    assert!(
        copied_bytes(&report) >= 163 * 4096,
        "step 7 copied: {report}"
    );
    env.ok(&["kill", &name]);
    job.wait();
    restart_and_check(&env, &job);
}

/// Takes a checkpoint of t_zap (`name`, started in `env` with a slowing test point) that
/// lets it run on, and has it change its pages 300 ms after the checkpoint began, while
/// the checkpoint still runs; returns the report.
fn checkpoint_while_zapping(env: &Env, name: &str, job: &Job) -> Value {
    env.wait_output(job, "READY\n");
    std::thread::scope(|s| {
        let checkpoint = s.spawn(|| env.checkpoint(name, false));
        std::thread::sleep(std::time::Duration::from_millis(300));
        fs::write(env.work.join("zap"), b"").expect("zap file");
        env.wait_output(job, "ZAPPED\n");
        assert!(
            !checkpoint.is_finished(),
            "the job changed its pages only after the checkpoint ended"
        );
        checkpoint.join().expect("checkpoint thread")
    })
}

/// Pages dropped with `MADV_DONTNEED`, written, or first touched in the moment between a
/// checkpoint's cut and the renewal of their write protection (held open a second by the
/// `slow-reprotect` test point) are read again by the next checkpoint: restarted from it,
/// t_zap finds every page as it left it. (Pages never touched stay out of both.)
#[test]
fn pages_dropped_or_written_right_after_a_cut_are_read_again() {
    let env = Env::new();
    let name = env.name("zap");
    let prog = program("t_zap", false);
    let work = env.work.to_str().unwrap();
    let vars = [("STASIS_FAULT", "slow-reprotect")];
    let mut job = env.start_with_env(&name, &[], &prog, &[work], &vars);
    let first = checkpoint_while_zapping(&env, &name, &job);
    // The cut saw the 768 pages written before the change, all of them.
    assert!(
        first["memory_bytes"].as_u64().unwrap() >= 768 * 4096,
        "the job changed its pages before the cut: {first}"
    );
    let second = env.checkpoint(&name, false);
    assert!(unchanged_pages(&second) > 0, "{second}");
    env.ok(&["kill", &name]);
    job.wait();
    let out = env.restart_to_success(&job, &[]);
    assert_all_pass(&out);
    assert_eq!(out.matches("PASS t_zap").count(), 4, "{out}");
}

/// The first checkpoint of a large process reads its memory before the cut, while the job
/// runs (a pre-copy). Pages the job drops with `MADV_DONTNEED`, writes or first touches
/// after the pre-copy read them (the `slow-precopy` test point holds that moment open a
/// second) are read at the cut: restarted, t_zap (with 40 MiB of filler, to be large
/// enough) finds every page as it left it, not as the pre-copy read it.
#[test]
fn pages_changed_after_a_precopy_are_read_at_the_cut() {
    let env = Env::new();
    let name = env.name("zap-precopy");
    let prog = program("t_zap", false);
    let work = env.work.to_str().unwrap();
    let vars = [("STASIS_FAULT", "slow-precopy")];
    let mut job = env.start_with_env(&name, &[], &prog, &[work, "40"], &vars);
    let first = checkpoint_while_zapping(&env, &name, &job);
    // The 40 MiB of filler and the region's pages were read before the cut; the 210
    // pages changed after it were not taken from it.
    assert!(precopied_pages(&first) >= 40 * 256, "{first}");
    assert_eq!(unchanged_pages(&first), 0, "{first}");
    env.ok(&["kill", &name]);
    job.wait();
    let out = env.restart_to_success(&job, &[]);
    assert_all_pass(&out);
    assert_eq!(out.matches("PASS t_zap").count(), 5, "{out}");
}

/// Memory never touched stays so through checkpoints and restarts: t_reserve's 64 GiB
/// mapped but never written and its 64 MiB `PROT_NONE` reserve. Write tracking's
/// protection of a page never touched leaves a marker that pagemap shows as a page swapped
/// out (a pre-copy that read those mapped a zero page into each: 49,000 for 128 MiB and
/// the reserve, where the job has 10,000 pages), and protecting a range never touched makes
/// page tables for it (128 MiB of them for 64 GiB). The program checks with `mincore` that
/// no page came into memory and that its page tables stay small, then writes one page
/// there, which the restart must bring back. The second
/// round restarts the generation before that check: the restart protects the memory it
/// restored, leaving markers, and the checkpoint after it reads everything (its base is
/// the newest generation), through a pre-copy, which must not read them either.
#[test]
fn memory_never_touched_stays_untouched() {
    let env = Env::new();
    let name = env.name("reserve");
    let mut job = env.start(
        &name,
        &program("t_reserve", false),
        &[env.work.to_str().unwrap()],
    );
    env.wait_output(&job, "READY\n");
    let first = env.checkpoint(&name, false);
    assert!(precopied_pages(&first) >= 40 * 256, "a pre-copy: {first}");
    env.checkpoint(&name, false);
    let check = env.work.join("check");
    fs::write(&check, b"").expect("check file");
    env.wait_output(&job, "CHECKED\n");
    env.checkpoint(&name, true);
    assert_eq!(job.wait(), EXIT_CHECKPOINTED);

    fs::remove_file(&check).expect("remove the check file");
    fs::write(&job.out, b"").expect("truncate output");
    let mut restarted = env.restart(&job, &["--eager", "--generation", "2"]);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let again = env.checkpoint(&name, false);
    assert!(precopied_pages(&again) >= 40 * 256, "a pre-copy: {again}");
    assert_none_unchanged(&again, "a restart from an older generation");
    fs::write(&check, b"").expect("check file");
    env.wait_output(&job, "CHECKED\n");
    env.go();
    let code = restarted.wait();
    let out = env.output(&job);
    assert_eq!(code, 0, "output:\n{out}\nstderr:\n{}", env.stderr(&job));
    assert_all_pass(&out);
    assert_eq!(out.matches("PASS t_reserve").count(), 9, "{out}");
}

#[test]
fn tracking_is_not_trusted_when_its_base_is_damaged_or_a_checkpoint_failed() {
    let env = Env::new();
    let name = env.name("dirty-trust");
    let mut job = start_dirty(&env, &name, &[]);
    env.checkpoint(&name, false);
    step(&env, &job, 1);
    assert_mostly_unchanged(&env.checkpoint(&name, false));
    // Generation 2, which the pages were protected at, is damaged: the next checkpoint
    // cannot build on it and must read every page.
    let manifest = env.job_dir(&name).join("gen-0002/manifest");
    let mut bytes = fs::read(&manifest).expect("manifest");
    bytes.truncate(bytes.len() / 2);
    fs::write(&manifest, bytes).expect("damage manifest");
    step(&env, &job, 2);
    assert_none_unchanged(
        &env.checkpoint(&name, false),
        "the base is not the generation tracking dates from",
    );
    step(&env, &job, 3);
    assert_mostly_unchanged(&env.checkpoint(&name, false));
    step(&env, &job, 4);
    step(&env, &job, 5);
    let refused = env.fails(&["checkpoint", &name]);
    assert!(refused.contains("deleted"), "{refused}");
    step(&env, &job, 6);
    assert_none_unchanged(
        &env.checkpoint(&name, false),
        "the checkpoint before failed after protecting the pages again",
    );
    step(&env, &job, 7);
    assert_mostly_unchanged(&env.checkpoint(&name, true));
    assert_eq!(job.wait(), EXIT_CHECKPOINTED);
    restart_and_check(&env, &job);
}

#[test]
fn no_write_tracking_reads_every_page() {
    let env = Env::new();
    let name = env.name("dirty-off");
    let mut job = start_dirty(&env, &name, &["--no-write-tracking"]);
    env.checkpoint(&name, false);
    step(&env, &job, 1);
    assert_none_unchanged(&env.checkpoint(&name, true), "--no-write-tracking");
    assert_eq!(job.wait(), EXIT_CHECKPOINTED);
    restart_and_check(&env, &job);
}

/// A process that execs between checkpoints leaves its tracker bound to the address space
/// it left: the next checkpoint makes a new one, and the one after builds on it.
#[test]
fn a_process_that_execs_is_tracked_anew() {
    let env = Env::new();
    let name = env.name("dirty-exec");
    let dirty = program("t_dirty", false);
    let script = format!(
        "import os, time\n\
         x = bytearray(16 << 20)\n\
         for i in range(0, len(x), 4096): x[i] = 1\n\
         print('PY READY', flush=True)\n\
         while not os.path.exists({exec:?}): time.sleep(0.01)\n\
         os.execv({dirty:?}, [{dirty:?}, {work:?}])\n",
        exec = env.work.join("exec").to_string_lossy(),
        dirty = dirty.to_string_lossy(),
        work = env.work.to_string_lossy(),
    );
    let mut job = env.start_with(&name, &[], Path::new("/usr/bin/python3"), &["-c", &script]);
    env.wait_output(&job, "PY READY\n");
    env.checkpoint(&name, false);
    assert!(
        unchanged_pages(&env.checkpoint(&name, false)) >= 4096 * 9 / 10,
        "python's 16 MiB are known unchanged"
    );
    fs::write(env.work.join("exec"), b"").expect("exec file");
    env.wait_output(&job, "READY\nREADY\n");
    assert_none_unchanged(
        &env.checkpoint(&name, false),
        "the first checkpoint after exec",
    );
    step(&env, &job, 1);
    assert_mostly_unchanged(&env.checkpoint(&name, true));
    assert_eq!(job.wait(), EXIT_CHECKPOINTED);
    restart_and_check(&env, &job);
}

/// A program that writes all the time, also in the moments after each cut while its pages
/// are protected again: every checkpoint still holds the memory as it was at its cut, so
/// the program restarted from the last one finds every page consistent (t_churn.c).
#[test]
fn pages_written_during_checkpoints_come_back_as_at_the_cut() {
    let env = Env::new();
    let name = env.name("churn");
    let mut job = env.start(
        &name,
        &program("t_churn", false),
        &[env.work.to_str().unwrap()],
    );
    env.wait_output(&job, "READY\n");
    for i in 0..5 {
        let report = env.checkpoint(&name, false);
        if i > 0 {
            assert!(
                unchanged_pages(&report) > 1024,
                "tracking knows pages unchanged: {report}"
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(150));
    }
    env.checkpoint(&name, true);
    assert_eq!(job.wait(), EXIT_CHECKPOINTED);
    restart_and_check(&env, &job);
}

/// The status's account of restarted job `job`'s memory once `ready` holds for it (polled
/// every 10 ms, for up to a minute; the supervisor answers once the job runs).
fn memory_once(env: &Env, job: &mut Job, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let o = env.stasis(&["--json", "status", &job.name]);
        if o.status.success() {
            let v: Value = serde_json::from_slice(&o.stdout).expect("status prints JSON");
            if ready(&v["memory"]) {
                return v["memory"].clone();
            }
        }
        assert!(
            job.child.try_wait().expect("restart command").is_none(),
            "the restart ended: {}",
            env.stderr(job)
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the restart's memory never got there: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// [`memory_once`] the memory is loaded and no longer being handed over to write tracking.
fn memory_once_handed_over(env: &Env, job: &mut Job) -> Value {
    memory_once(env, job, |m| {
        m["loaded_after_ms"].is_number() && m["handing_over"] == false
    })
}

/// Whether restarted job `job`'s memory is still being handed over to write tracking.
fn handing_over(env: &Env, job: &Job) -> bool {
    env.status(&job.name)["memory"]["handing_over"] == true
}

/// Asserts that the restart's memory went over to write tracking slice by slice (`m` from
/// [`memory_once_handed_over`]) in at least `slices` slices, where the restart was lazy.
fn assert_handed_over(m: &Value, slices: u64) {
    if m["lazy"] == true {
        assert!(m["hand_over_slices"].as_u64().unwrap_or(0) >= slices, "{m}");
        assert!(m["handed_over_after_ms"].is_number(), "{m}");
    } else {
        assert!(!common::is_root(), "root restarts lazily: {m}");
    }
}

/// A lazily restarted job's memory, once loaded, goes over to write tracking a slice at a
/// time while the job runs (here one mapping at a time, 300 ms apart: the `small-hand-over`
/// test point), and t_churn writes all along, before, during and after: the next
/// checkpoint still knows pages unchanged (tracking trusted the memory handed over; t_churn
/// rewrites its pages all the time, so how many depends on the machine's speed), and
/// restarted from the one after it the program finds every page as it wrote it. (Without
/// `CAP_SYS_PTRACE` the restart is eager and there is nothing to hand over; the rest holds
/// all the same.)
#[test]
fn memory_handed_over_slice_by_slice_while_written_restarts_exactly() {
    let env = Env::new();
    let name = env.name("churn-handover");
    let mut job = env.start(
        &name,
        &program("t_churn", false),
        &[env.work.to_str().unwrap()],
    );
    env.wait_output(&job, "READY\n");
    env.checkpoint(&name, true);
    assert_eq!(job.wait(), EXIT_CHECKPOINTED);
    let vars = [("STASIS_FAULT", "small-hand-over")];
    let mut restarted = env.restart_with_env(&job, &[], &vars);
    let m = memory_once_handed_over(&env, &mut restarted);
    assert_handed_over(&m, 2);
    let report = env.checkpoint(&name, false);
    assert!(
        unchanged_pages(&report) > 0,
        "tracking knows pages unchanged after the hand-over: {report}"
    );
    env.checkpoint(&name, true);
    assert_eq!(restarted.wait(), EXIT_CHECKPOINTED, "{}", env.stderr(&job));
    restart_and_check(&env, &job);
}

/// t_dirty (64 MiB) changes its memory in every way write tracking must notice (steps 1-3:
/// writes, `MADV_DONTNEED`, `mremap`, a mapping replaced, a forked child's writes) while a
/// lazily restarted job's memory goes over to write tracking one mapping at a time
/// (`small-hand-over`): the program's calls all succeed (a slice never cuts a mapping,
/// which `mremap` would refuse to span), the next checkpoint knows most pages unchanged,
/// and restarted from the one after it the program finds every page as it left it.
#[test]
fn memory_changed_every_way_during_the_hand_over_restarts_exactly() {
    let env = Env::new();
    let name = env.name("dirty-handover");
    let work = env.work.to_str().unwrap();
    let mut job = env.start_with(&name, &[], &program("t_dirty", false), &[work, "16384"]);
    env.wait_output(&job, "READY\n");
    env.checkpoint(&name, true);
    assert_eq!(job.wait(), EXIT_CHECKPOINTED);
    let vars = [("STASIS_FAULT", "small-hand-over")];
    let mut restarted = env.restart_with_env(&job, &[], &vars);
    let m = memory_once(&env, &mut restarted, |m| m["loaded_after_ms"].is_number());
    let lazy = m["lazy"] == true;
    // Its mappings 300 ms apart take over a second: the steps come between them.
    assert!(!lazy || handing_over(&env, &restarted), "{m}");
    for k in 1..=3 {
        step(&env, &restarted, k);
    }
    assert!(
        !lazy || handing_over(&env, &restarted),
        "the hand-over ended before the steps did"
    );
    let m = memory_once_handed_over(&env, &mut restarted);
    assert_handed_over(&m, 2);
    assert_mostly_unchanged(&env.checkpoint(&name, false));
    env.checkpoint(&name, true);
    assert_eq!(restarted.wait(), EXIT_CHECKPOINTED, "{}", env.stderr(&job));
    restart_and_check(&env, &job);
}
