//! A supervisor's checkpoint policy: periodic checkpoints, how many generations to keep, and
//! the signal that asks for a checkpoint before the job is stopped (as a batch scheduler
//! sends before a time limit or a preemption).

use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::error::{JobError, JobResult};

/// When a supervisor takes checkpoints by itself, and what it keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// Take a checkpoint (the job continues) this often.
    pub interval: Option<Duration>,
    /// After each successful checkpoint, keep only this many generations (the newest).
    pub keep: Option<u32>,
    /// On this signal, take a checkpoint, end the job and exit with
    /// [`crate::supervisor::EXIT_CHECKPOINTED`].
    pub signal: Option<i32>,
    /// How long a checkpoint waits for libstasis pre-checkpoint callbacks (default
    /// [`crate::callbacks::DEFAULT_CALLBACK_TIMEOUT`]).
    pub callback_timeout: Option<Duration>,
    /// When pre-checkpoint callbacks overrun the timeout: fail the checkpoint (the job runs
    /// on) instead of taking it without them.
    pub fail_on_late_callbacks: bool,
    /// Every checkpoint keeps the content of the job's open files in the image
    /// (`--save-files`).
    pub save_files: bool,
    /// Do not track which pages the job writes between checkpoints
    /// (`--no-write-tracking`): every checkpoint reads all of the job's memory.
    pub no_write_tracking: bool,
}

/// Parses a checkpoint signal: `SIGUSR1`, `USR1`, `usr1` or a number (`10`, `SIGRTMIN+2` is
/// given as its number). Refuses signals that cannot be caught (`KILL`, `STOP`), that the
/// supervisor needs itself (`CHLD`), or that report faults (`SEGV`, `BUS`, `FPE`, `ILL`,
/// `TRAP`, `SYS`).
pub fn parse_signal(given: &str) -> JobResult<i32> {
    let bad = |reason: &str| JobError::BadSignal {
        given: given.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = given.trim();
    let sig = if let Ok(n) = trimmed.parse::<i32>() {
        if !(1..=libc::SIGRTMAX()).contains(&n) {
            return Err(bad(&format!(
                "signal numbers go from 1 to {}",
                libc::SIGRTMAX()
            )));
        }
        n
    } else {
        let upper = trimmed.to_ascii_uppercase();
        let full = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        Signal::from_str(&full)
            .map_err(|_| bad("unknown signal name (try USR1, USR2, TERM or a number)"))?
            as i32
    };
    match sig {
        libc::SIGKILL | libc::SIGSTOP => Err(bad("it cannot be caught")),
        libc::SIGCHLD => Err(bad("the supervisor needs it to follow its job")),
        libc::SIGSEGV
        | libc::SIGBUS
        | libc::SIGFPE
        | libc::SIGILL
        | libc::SIGTRAP
        | libc::SIGSYS => Err(bad("it reports a fault")),
        _ => Ok(sig),
    }
}

/// The conventional name of signal `sig` (`SIGUSR1`), or `SIGRTMIN+N`, or its number.
pub fn signal_name(sig: i32) -> String {
    match Signal::try_from(sig) {
        Ok(s) => s.as_str().to_owned(),
        Err(_) if (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&sig) => {
            format!("SIGRTMIN+{}", sig - libc::SIGRTMIN())
        }
        Err(_) => format!("signal {sig}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        for s in ["SIGUSR1", "USR1", "usr1", "sigusr1", " 10 "] {
            assert_eq!(parse_signal(s).unwrap(), libc::SIGUSR1, "{s}");
        }
        assert_eq!(parse_signal("TERM").unwrap(), libc::SIGTERM);
        assert_eq!(parse_signal("40").unwrap(), 40);
        assert_eq!(signal_name(libc::SIGUSR1), "SIGUSR1");
        assert_eq!(signal_name(libc::SIGRTMIN() + 2), format!("SIGRTMIN+{}", 2));
    }

    #[test]
    fn refused_signals_say_why() {
        for (s, why) in [
            ("KILL", "cannot be caught"),
            ("SIGSTOP", "cannot be caught"),
            ("CHLD", "needs it"),
            ("SEGV", "fault"),
            ("0", "from 1"),
            ("65", "from 1"),
            ("FOO", "unknown signal"),
            ("", "unknown signal"),
        ] {
            let e = parse_signal(s).unwrap_err().to_string();
            assert!(e.contains(why), "{s}: {e}");
        }
    }
}
