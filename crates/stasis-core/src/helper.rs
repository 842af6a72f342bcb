//! One helper thread for work a supervisor does beside its own: reading smaps while the
//! job stands frozen, checking mapping flags once it runs again.
//!
//! A process whose children get a pid or time namespace of their own can no longer make
//! threads (`clone` with `CLONE_THREAD` or `CLONE_VM` fails with `EINVAL` once its
//! namespace for children differs from its own), and one that unshares a user namespace
//! must be single-threaded: a supervisor starts the helper in between ([`start`]). Without
//! a helper, work runs where it is asked for. The helper keeps a descriptor table of its
//! own, with no descriptor of the supervisor's: a table shared between threads makes every
//! growth of it wait for an RCU grace period (measured: a restart's first descriptor
//! above 255 took 16 ms instead of microseconds).

use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender, channel};

type Work = Box<dyn FnOnce() + Send>;

static HELPER: Mutex<Option<Sender<Work>>> = Mutex::new(None);

/// Starts the helper thread, once; whether it runs.
pub fn start() -> bool {
    let mut helper = HELPER.lock().unwrap_or_else(|p| p.into_inner());
    if helper.is_some() {
        return true;
    }
    let (tx, rx) = channel::<Work>();
    let spawned = std::thread::Builder::new()
        .name("stasis-helper".into())
        .spawn(move || {
            // Without a table of its own the helper still works; only growing the
            // supervisor's table costs more then.
            if let Err(e) = stasis_sys::fd::own_table_with_stdio_only() {
                tracing::debug!("the helper thread shares the descriptor table: {e}");
            }
            for work in rx {
                work();
            }
        });
    if spawned.is_ok() {
        *helper = Some(tx);
    }
    spawned.is_ok()
}

/// The result of work handed to the helper ([`beside`]).
#[derive(Debug)]
pub struct Beside<T>(Receiver<T>);

impl<T> Beside<T> {
    /// Waits for the work to end and gives its result; `None` if the helper died first.
    pub fn wait(self) -> Option<T> {
        self.0.recv().ok()
    }
}

/// Runs `work` on the helper thread, one piece of work after another (without a helper,
/// now); [`Beside::wait`] gives its result.
pub fn beside<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Beside<T> {
    let (tx, rx) = channel();
    let work: Work = Box::new(move || {
        let _ = tx.send(work());
    });
    let helper = HELPER.lock().unwrap_or_else(|p| p.into_inner());
    let refused = match helper.as_ref() {
        Some(to_helper) => to_helper.send(work).err().map(|e| e.0),
        None => Some(work),
    };
    drop(helper);
    if let Some(work) = refused {
        work();
    }
    Beside(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_runs_on_the_helper_thread() {
        assert!(start());
        let name = beside(|| std::thread::current().name().map(str::to_owned));
        assert_eq!(name.wait().flatten().as_deref(), Some("stasis-helper"));
    }
}
