//! Copy-on-write snapshots: a checkpoint that lets the job run on freezes it only while its
//! metadata is captured; its memory is read from a snapshot afterwards. The image must
//! still be one consistent cut, and the snapshot must leave no trace in the job.

mod common;

use common::{EXIT_CHECKPOINTED, Env, assert_all_pass, program};

/// `t_cow` sweeps 64 MiB as fast as it can while being checkpointed; the restarted image
/// must hold the memory exactly as it was at the cut.
fn sweep_survives(kill: bool) {
    let env = Env::new();
    let name = env.name(if kill { "cow-kill" } else { "cow" });
    let prog = program("t_cow", false);
    let mut job = env.start(&name, &prog, &[env.work.to_str().unwrap(), "64"]);
    env.wait_output(&job, "READY\n");
    let report = env.checkpoint(&name, kill);
    assert_eq!(report["generation"], 1, "{report}");
    if kill {
        assert_eq!(job.wait(), EXIT_CHECKPOINTED);
    } else {
        // The job ran on while its memory was read; the snapshot left no trace in it.
        std::fs::write(env.work.join("side"), "").unwrap();
        env.wait_output(&job, "SIDE DONE\n");
        assert!(!env.output(&job).contains("FAIL"), "{}", env.output(&job));
        env.ok(&["kill", &name]);
        job.wait();
    }
    assert_all_pass(&env.restart_to_success(&job, &[]));
}

#[test]
fn memory_written_during_a_checkpoint_that_continues_is_saved_as_at_the_cut() {
    sweep_survives(false);
}

#[test]
fn memory_written_until_a_checkpoint_kill_is_saved_as_at_the_cut() {
    sweep_survives(true);
}

/// `t_forkflags` has memory a fork leaves out (`MADV_DONTFORK`) or wipes
/// (`MADV_WIPEONFORK`), read from the job itself rather than from the snapshot, and changes
/// those flags on whole mappings between two checkpoints that let it run on: the newer
/// generation must hold every page as written before it, and the restart must give the
/// mappings their advice back. The second checkpoint starts from the flags the first one
/// read (carried) and must mend what they got wrong: with every page written it takes a
/// snapshot, which must not be trusted with the mapping made wipe-on-fork meanwhile; with
/// nothing written (`few`) it copies at the cut, and only the advice needs mending.
fn fork_flags_changed_between_checkpoints(few: bool) {
    let env = Env::new();
    let name = env.name(if few { "forkflags-few" } else { "forkflags" });
    let prog = program("t_forkflags", false);
    let work = env.work.to_str().unwrap().to_owned();
    let args: &[&str] = if few { &[&work, "few"] } else { &[&work] };
    let mut job = env.start(&name, &prog, args);
    env.wait_output(&job, "READY\n");
    assert_eq!(env.checkpoint(&name, false)["generation"], 1);
    std::fs::write(env.work.join("step"), "").unwrap();
    env.wait_output(&job, "STEP DONE\n");
    let report = env.checkpoint(&name, false);
    assert_eq!(report["generation"], 2, "{report}");
    env.ok(&["kill", &name]);
    job.wait();
    // Restarted lazily where allowed, loading only what the program touches: its child,
    // forked before it touches anything, must see the advice's effect all the same.
    let out = env.restart_to_success(&job, &[("STASIS_FAULT", "no-prefetch")]);
    assert_all_pass(&out);
    assert_eq!(out.matches("PASS t_forkflags").count(), 7, "{out}");
}

#[test]
fn memory_left_out_of_or_wiped_in_a_fork_is_saved_as_the_job_has_it() {
    fork_flags_changed_between_checkpoints(false);
}

#[test]
fn advice_changed_between_checkpoints_comes_back_when_little_was_written() {
    fork_flags_changed_between_checkpoints(true);
}
