//! Footprint estimates from a process model's GGUF header, through the real daemon: the estimate
//! in status matches a hand computation, admission reserves it for a model never measured, and the
//! measurement is stored with the estimate it was made under.

mod common;

use std::time::{Duration, Instant};

use common::gguf::Gguf;
use common::{Daemon, model_in, sim_config, undeclared_fake_model};

const SECOND: Duration = Duration::from_secs(1);

/// One layer with four heads of 16 (no grouped-query attention), 4096 tokens of context and a
/// 768-token vocabulary; one F16 tensor of 1024 × 1024.
fn one_layer() -> Gguf {
    Gguf::new()
        .text("general.architecture", "llama")
        .u32("llama.block_count", 1)
        .u32("llama.context_length", 4096)
        .u32("llama.embedding_length", 64)
        .u32("llama.attention.head_count", 4)
        .u32("llama.vocab_size", 768)
        .tensor("token_embd.weight", &[64, 768], 0, 64 * 768 * 4)
        .tensor("blk.0.ffn_up.weight", &[1024, 1024], 1, 1024 * 1024 * 2)
}

/// The hand computation (docs/configuration.md, "Footprint estimates"): weights 2 MiB (the F16
/// tensor) plus 192 KiB (the file has no `output.weight`, so llama.cpp copies token_embd, 64 ×
/// 768 F32, to the GPU as the output head), KV cache 4096 × 4 heads × (16 + 16) × 2 bytes =
/// 1 MiB, compute 512 × 4 × (768 + 4 × 64) = 2 MiB, runtime 256 MiB: 261.19 MiB, rounded up.
const ESTIMATE_MIB: u64 = 262;

#[tokio::test]
async fn a_model_never_measured_is_estimated_from_its_header_admitted_with_it_and_measured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weights = dir.path().join("one-layer.gguf");
    one_layer().write(&weights);
    let broken = dir.path().join("broken.gguf");
    std::fs::write(&broken, b"not a model").expect("write");
    let keys = format!("weights = \"{}\"", weights.display());
    let broken_keys = format!("weights = \"{}\"", broken.display());
    let daemon = Daemon::start(|sim| {
        format!(
            "{}\n{}\n{}",
            sim_config(sim, 8000, "20ms", "reserve_mib = 0"),
            undeclared_fake_model(sim, "est", 300, "--load-delay 300ms", &keys),
            undeclared_fake_model(sim, "unknown", 300, "", &broken_keys),
        )
    });
    let status = daemon.status().await;
    assert_eq!(model_in(&status, "est")["estimated_mib"], ESTIMATE_MIB, "{status:#}");
    assert!(model_in(&status, "unknown")["estimated_mib"].is_null(), "no estimate from a broken file");
    let log = daemon.log();
    assert!(log.contains("broken.gguf") && log.contains("not a GGUF file"), "the reason is logged: {log}");

    // While it loads, it is counted at its estimate, not at everything free.
    let loader = {
        let url = daemon.url.clone();
        tokio::spawn(async move {
            common::http::client().post(format!("{url}/vramgate/models/est/load")).send().await.map(|r| r.status())
        })
    };
    let loading = daemon.wait_for_status(5 * SECOND, "est loading", |s| model_in(s, "est")["state"] == "loading").await;
    assert_eq!(model_in(&loading, "est")["vram_mib"], ESTIMATE_MIB, "{loading:#}");
    let answer = tokio::time::timeout(10 * SECOND, loader).await.expect("the load answers").unwrap().expect("load");
    assert_eq!(answer.as_u16(), 200);

    // Measured at what it really uses; stored with the estimate it was made under.
    daemon.wait_for_status(5 * SECOND, "est measured", |s| model_in(s, "est")["measured_mib"] == 300).await;
    let store = vramgate::store::Store::open(&daemon.dir.path().join("state").join("vramgate")).expect("state db");
    let end = Instant::now() + 5 * SECOND;
    while store.footprint_estimates().expect("footprints").get("est") != Some(&ESTIMATE_MIB) {
        assert!(Instant::now() < end, "est's estimate not stored: {:?}", store.footprint_estimates());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.footprints().expect("footprints").get("est"), Some(&300));
}
