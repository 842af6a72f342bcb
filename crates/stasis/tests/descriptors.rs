//! eventfd, timerfd, signalfd, epoll and memfd descriptors survive a checkpoint.

mod common;

use common::{EXIT_CHECKPOINTED, Env, assert_all_pass, program};

fn run(kill: bool, static_link: bool) {
    let env = Env::new();
    let name = env.name("evfds");
    let prog = program("evfds", static_link);
    let mut job = env.start(&name, &prog, &[env.work.to_str().unwrap()]);
    env.wait_output(&job, "READY\n");
    env.checkpoint(&name, kill);
    let mut job = if kill {
        assert_eq!(job.wait(), EXIT_CHECKPOINTED);
        env.restart(&job, &[])
    } else {
        job
    };
    env.go();
    assert_eq!(job.wait(), 0, "stderr: {}", env.stderr(&job));
    assert_all_pass(&env.output(&job));
}

#[test]
fn event_descriptors_survive_kill_and_restart() {
    run(true, false);
}

#[test]
fn event_descriptors_survive_kill_and_restart_static() {
    run(true, true);
}

#[test]
fn event_descriptors_survive_a_checkpoint_that_continues() {
    run(false, false);
}
