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
    env.go();
    let mut restarted = env.restart(&job, &[]);
    assert_eq!(
        restarted.wait(),
        0,
        "output:\n{}\nstderr: {}",
        env.output(&job),
        env.stderr(&restarted)
    );
    assert_all_pass(&env.output(&job));
}

#[test]
fn memory_written_during_a_checkpoint_that_continues_is_saved_as_at_the_cut() {
    sweep_survives(false);
}

#[test]
fn memory_written_until_a_checkpoint_kill_is_saved_as_at_the_cut() {
    sweep_survives(true);
}
