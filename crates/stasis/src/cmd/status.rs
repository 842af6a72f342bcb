//! `stasis status`: a running job's state.

use anyhow::{Result, bail};
use stasis_job::control::{Request, Response, request};
use stasis_job::paths;

use crate::output::emit;

/// Arguments of `stasis status`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Job name.
    name: String,
}

/// Runs the verb.
pub fn run(a: Args, json: bool) -> Result<i32> {
    let socket = paths::socket_path(&a.name)?;
    match request(&a.name, &socket, &Request::Status)? {
        Response::Status(s) => {
            emit(json, &s, || {
                let ns = &s.namespaces;
                let mut t = format!(
                    "job:          {}\nstate:        {}\npid:          {} ({} inside the job)\nsupervisor:   {}\ncommand:      {}\nimages:       {}\nnamespaces:   user={} pid={} time={} proc={}\ncheckpoints:  {} by this supervisor, newest generation {}",
                    s.name,
                    s.state,
                    s.pid,
                    s.job_pid,
                    s.supervisor_pid,
                    s.command.join(" "),
                    s.images,
                    ns.user,
                    ns.pid,
                    ns.time,
                    ns.proc,
                    s.checkpoints,
                    s.latest_generation.map_or("none".into(), |g| g.to_string())
                );
                if let Some(g) = s.restarted_from {
                    t.push_str(&format!("\nrestarted:    from generation {g}"));
                }
                if let Some(m) = &s.memory {
                    let mib = |b: u64| b as f64 / 1048576.0;
                    t.push_str(&match (m.lazy, m.loaded_after_ms) {
                        (true, Some(ms)) => format!(
                            "\nmemory:       loaded lazily, {:.1} MiB in {ms:.0} ms ({} faults served)",
                            mib(m.loaded_bytes),
                            m.faults
                        ),
                        (true, None) => format!(
                            "\nmemory:       loading lazily, {:.1} of {:.1} MiB ({} faults served)",
                            mib(m.loaded_bytes),
                            mib(m.total_bytes),
                            m.faults
                        ),
                        (false, _) => format!(
                            "\nmemory:       restored eagerly{}",
                            m.eager_because
                                .as_ref()
                                .map(|w| format!(" ({w})"))
                                .unwrap_or_default()
                        ),
                    });
                    if let Some(ms) = m.handed_over_after_ms {
                        t.push_str(&format!(
                            "\ntracking:     memory handed over to write tracking after {ms:.0} ms, in {} slices (job frozen at most {:.1} ms for one)",
                            m.hand_over_slices, m.hand_over_frozen_ms
                        ));
                    }
                }
                for n in &ns.notes {
                    t.push_str(&format!("\nnote:         {n}"));
                }
                t
            });
            Ok(0)
        }
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the supervisor: {other:?}"),
    }
}
