//! eventfd, timerfd, signalfd, epoll, memfd descriptors, unix sockets, FIFOs, SysV
//! semaphores and message queues, inotify watches and pseudo-terminals survive a checkpoint.

mod common;

use common::{EXIT_CHECKPOINTED, Env, assert_all_pass, program};

/// Runs test program `prog` under Stasis across a checkpoint (`kill`: then restart).
fn run(prog: &str, kill: bool, static_link: bool) {
    let env = Env::new();
    let name = env.name(prog);
    let prog = program(prog, static_link);
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
    run("evfds", true, false);
}

#[test]
fn event_descriptors_survive_kill_and_restart_static() {
    run("evfds", true, true);
}

#[test]
fn event_descriptors_survive_a_checkpoint_that_continues() {
    run("evfds", false, false);
}

#[test]
fn unix_sockets_survive_kill_and_restart() {
    run("socks", true, false);
}

#[test]
fn unix_sockets_survive_a_checkpoint_that_continues() {
    run("socks", false, false);
}

#[test]
fn tcp_and_udp_sockets_survive_kill_and_restart() {
    run("tcpsock", true, false);
}

#[test]
fn tcp_and_udp_sockets_survive_a_checkpoint_that_continues() {
    run("tcpsock", false, false);
}

#[test]
fn fifos_survive_kill_and_restart() {
    run("fifo", true, false);
}

#[test]
fn fifos_survive_a_checkpoint_that_continues() {
    run("fifo", false, false);
}

#[test]
fn sysv_semaphores_queues_inotify_and_ptys_survive_kill_and_restart() {
    run("t_ipc", true, false);
}

#[test]
fn sysv_semaphores_queues_inotify_and_ptys_survive_a_checkpoint_that_continues() {
    run("t_ipc", false, false);
}

#[test]
fn backpressured_tcp_and_unaccepted_connections_survive_kill_and_restart() {
    run("t_backlog", true, false);
}

#[test]
fn backpressured_tcp_and_unaccepted_connections_survive_a_checkpoint_that_continues() {
    run("t_backlog", false, false);
}
