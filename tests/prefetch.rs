//! Prefetch during a swap, through the real daemon: while a load waits for its victim's memory,
//! the incoming model's weights file is read into the page cache, and the log says so; with
//! `[scheduler] prefetch = false` nothing is read.

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, fake_model, sim_config};

const SECOND: Duration = Duration::from_secs(1);

fn swap(prefetch: bool) -> (Daemon, std::path::PathBuf) {
    let mut weights = std::path::PathBuf::new();
    let daemon = Daemon::start(|sim| {
        // Beside the sim directory, in the daemon's own temp dir: it lives as long as the daemon.
        weights = sim.with_file_name("new.bin");
        std::fs::write(&weights, vec![7u8; 16 << 20]).expect("write the weights file");
        let keys = format!("priority = 90\nweights = \"{}\"", weights.display());
        format!(
            "{}\n[scheduler]\nprefetch = {prefetch}\n{}\n{}",
            sim_config(sim, 8000, "20ms", "reserve_mib = 0"),
            // The victim takes half a second to stop: the release the prefetch overlaps.
            fake_model(sim, "old", 6000, "--stop-delay 500ms", "priority = 10"),
            fake_model(sim, "new", 3000, "", &keys),
        )
    });
    (daemon, weights)
}

#[tokio::test]
async fn a_swap_reads_the_incoming_models_weights_while_the_victim_is_released() {
    let (daemon, weights) = swap(true);
    assert_eq!(daemon.load("old").await.0, 200);
    assert_eq!(daemon.load("new").await.0, 200, "old is evicted for new");
    let wanted = format!("prefetched {} (16 MiB)", weights.display());
    let deadline = Instant::now() + 5 * SECOND;
    while !daemon.log().contains(&wanted) {
        assert!(Instant::now() < deadline, "no prefetch logged: {}", daemon.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Read while old was being released (half a second): logged before new started loading.
    let log = daemon.log();
    let read = log.find(&wanted).expect("logged");
    let new_started = log.find("model new: unloaded -> loading").expect("new started");
    assert!(read < new_started, "the prefetch ended after new started:\n{log}");
}

#[tokio::test]
async fn with_prefetch_off_nothing_is_read_ahead() {
    let (daemon, _weights) = swap(false);
    assert_eq!(daemon.load("old").await.0, 200);
    assert_eq!(daemon.load("new").await.0, 200);
    assert!(!daemon.log().contains("prefetch"), "{}", daemon.log());
}
