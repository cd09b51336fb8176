//! A child process's output, line by line as it comes.

use std::io::{BufRead, BufReader};
use std::sync::mpsc;

/// Forwards each line of a pipe as it comes.
pub fn lines_of(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}
