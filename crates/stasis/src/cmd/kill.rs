//! `stasis kill`: end a running job.

use anyhow::{Result, bail};
use stasis_job::control::{Request, Response, request};
use stasis_job::paths;

use crate::output::emit;

/// Arguments of `stasis kill`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Job name.
    name: String,
}

/// Runs the verb.
pub fn run(a: Args, json: bool) -> Result<i32> {
    let socket = paths::socket_path(&a.name)?;
    match request(&a.name, &socket, &Request::Kill)? {
        Response::Ok => {
            emit(json, &serde_json::json!({ "killed": a.name }), || {
                format!("job {:?} killed", a.name)
            });
            Ok(0)
        }
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the supervisor: {other:?}"),
    }
}
