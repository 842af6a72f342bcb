//! The control protocol: one JSON line from a peer on the job's socket, decoded as a
//! request (what a supervisor reads) and as a response (what the command line reads).
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use stasis_job::control::{Request, Response, read_message};

fuzz_target!(|data: &[u8]| {
    for decode in [0, 1] {
        let (mut a, b) = UnixStream::pair().unwrap();
        // Write what fits in the socket buffer, then close our end: the reader sees EOF.
        let _ = a.set_nonblocking(true);
        let _ = a.write(data);
        drop(a);
        if decode == 0 {
            let _ = read_message::<Request>(&b);
        } else {
            let _ = read_message::<Response>(&b);
        }
    }
});
