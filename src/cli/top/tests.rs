//! The view drawn on ratatui's `TestBackend` from hand-made states, read back as text.

use chrono::{TimeZone, Utc};
use ratatui::Terminal;
use ratatui::backend::TestBackend;

use super::feed::reported_thresholds;
use super::render::{bar, draw};
use super::state::{Connection, EVENTS_KEPT, Key, Outcome, Request, TopState, Update};
use crate::events::{Event, EventKind, ModelState};
use crate::gpu::{Level, ProbeKind, Thresholds};
use crate::status::{DeviceStatus, LeaseStatus, ModelStatus, ProcessStatus, QueueEntry, Status};

const URL: &str = "http://127.0.0.1:9999";

fn now() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).single().expect("a valid time")
}

fn model(id: &str, state: &str, vram_mib: u64) -> ModelStatus {
    let loaded = state != "unloaded";
    ModelStatus {
        id: id.to_string(),
        backend: "process".to_string(),
        state: state.to_string(),
        device: loaded.then_some(0),
        vram_mib,
        in_use: 0,
        pinned: false,
        priority: 0,
        last_used: None,
        upstream: None,
        pid: None,
        measured_mib: None,
        declared_mib: Some(vram_mib),
        estimated_mib: None,
        peak_mib: None,
        failures: 0,
        retry_in_s: None,
        last_error: None,
        aliases: Vec::new(),
        placement: loaded.then(|| "gpu".to_string()),
        expires_at: None,
        note: None,
        attached: None,
        state_reason: None,
    }
}

/// One 10000 MiB device at warning: `llm` holds 5000 MiB through its process, something else
/// 2600; `vision` is not loaded. One lease and one queued load.
fn status() -> Status {
    let mut llm = model("llm", "ready", 5000);
    llm.measured_mib = Some(4990);
    llm.in_use = 2;
    llm.expires_at = Some(now() + chrono::Duration::seconds(90));
    Status {
        version: "0.1.0".to_string(),
        probe: ProbeKind::Sim,
        devices: vec![DeviceStatus {
            index: 0,
            name: "Sim Test".to_string(),
            probe: ProbeKind::Sim,
            total_mib: 10000,
            used_mib: 7600,
            free_mib: 2400,
            usable_mib: 9500,
            level: Level::Warning,
            utilization_pct: None,
            temperature_c: None,
            processes: vec![ProcessStatus {
                pid: 42,
                used_mib: Some(5000),
                name: "llama-server".to_string(),
                model: Some("llm".to_string()),
            }],
            processes_unavailable: None,
            named_consumers: Vec::new(),
            warnings: Vec::new(),
            error: None,
        }],
        degraded: false,
        degraded_reasons: Vec::new(),
        models: vec![llm, model("vision", "unloaded", 3000)],
        leases: vec![LeaseStatus {
            id: "l-1".to_string(),
            holder: "trainer".to_string(),
            device: 0,
            vram_mib: 1200,
            exclusive: false,
            model: None,
            priority: 0,
            granted_at: None,
        }],
        queue: vec![QueueEntry {
            requester: "vision".to_string(),
            kind: "load".to_string(),
            model: Some("vision".to_string()),
            holder: None,
            pid: None,
            device: None,
            vram_mib: 3000,
            priority: 0,
            reason: Some("needs 3000 MiB on GPU 0; 1900 MiB available".to_string()),
            since: now() - chrono::Duration::seconds(12),
        }],
        mode: Some("chat".to_string()),
        ollama: Vec::new(),
        sampled_at: Some(now()),
        limits: None,
    }
}

fn connected() -> TopState {
    let mut state = TopState::new(URL, now());
    state.apply(Update::Status(Box::new(status()), Vec::new()));
    state.apply(Update::Modes(vec!["chat".to_string(), "vision".to_string()]));
    state.apply(Update::Connected);
    state.apply(Update::Event(Box::new(Event {
        seq: 1,
        time: now(),
        kind: EventKind::ModelState {
            model: "llm".to_string(),
            from: ModelState::Loading,
            to: ModelState::Ready,
            reason: "requested".to_string(),
            device: Some(0),
            vram_mib: 5000,
            error: None,
        },
    })));
    state
}

/// The screen as lines of text (colours dropped).
fn screen(state: &TopState, width: u16, height: u16) -> Vec<String> {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("a test terminal");
    terminal.draw(|frame| draw(frame, state)).expect("draw");
    let buffer = terminal.backend().buffer();
    (0..height).map(|y| (0..width).map(|x| buffer[(x, y)].symbol()).collect::<String>()).collect()
}

fn line_with<'a>(lines: &'a [String], text: &str) -> &'a str {
    lines
        .iter()
        .find(|line| line.contains(text))
        .unwrap_or_else(|| panic!("no line with {text:?} on the screen:\n{}", lines.join("\n")))
}

/// A model's row in the table (the legend also names loaded models, next to the thresholds).
fn model_row<'a>(lines: &'a [String], id: &str) -> &'a str {
    let swatch = format!("■ {id} ");
    lines
        .iter()
        .find(|line| line.contains(&swatch) && !line.contains("warning"))
        .unwrap_or_else(|| panic!("no row for {id} on the screen:\n{}", lines.join("\n")))
}

fn bar_text(status: &Status, thresholds: Thresholds, width: u16) -> String {
    bar(status, &status.devices[0], thresholds, width).spans.iter().map(|s| s.content.as_ref()).collect()
}

#[test]
fn the_bar_shows_each_model_the_rest_in_use_free_memory_and_the_thresholds() {
    // 100 cells of 100 MiB: llm's 5000 MiB, 2600 more in use, 2400 free; the default
    // thresholds (75, 87.5, 95 %) at cells 75, 87 and 95.
    let mut expected: Vec<char> = "█".repeat(50).chars().chain("▒".repeat(26).chars()).collect();
    expected.extend("░".repeat(24).chars());
    for cell in [75, 87, 95] {
        expected[cell] = '│';
    }
    assert_eq!(bar_text(&status(), Thresholds::default(), 100), expected.into_iter().collect::<String>());

    // Thresholds the daemon reported move the marks; a full device has no free cell.
    let mut full = status();
    full.devices[0].used_mib = 10000;
    let custom = Thresholds { warning_pct: 50.0, critical_pct: 60.0, emergency_pct: 100.0 };
    let text: Vec<char> = bar_text(&full, custom, 10).chars().collect();
    assert_eq!(text, ['█', '█', '█', '█', '█', '│', '│', '▒', '▒', '│']);
}

#[test]
fn the_screen_shows_devices_models_leases_queue_and_events() {
    let lines = screen(&connected(), 120, 40);
    let heading = line_with(&lines, "GPU 0 Sim Test");
    assert!(heading.contains(" WARNING "), "{heading}");
    assert!(heading.contains("7600 / 10000 MiB used (76.0%), 2400 MiB free, 9500 usable"), "{heading}");
    // Inside the block's borders: the bar, with its three threshold marks.
    let bar: String = line_with(&lines, "████").chars().skip(1).take(118).collect();
    assert_eq!(bar.matches('│').count(), 3, "the bar marks the thresholds: {bar}");
    let legend = line_with(&lines, "warning 75% critical 87.5% emergency 95% (defaults)");
    assert!(legend.contains("llm 5000") && legend.contains("other 2600"), "{legend}");

    let llm = model_row(&lines, "llm");
    for column in ["▶", "ready", "GPU 0", "5000", "4990", "2", "1m"] {
        assert!(llm.contains(column), "{column:?} missing in the row: {llm}");
    }
    let vision = model_row(&lines, "vision");
    assert!(vision.contains("unloaded") && !vision.contains('▶'), "{vision}");
    assert!(line_with(&lines, "Leases (1)").contains("Queue (1)"));
    assert!(line_with(&lines, "trainer").contains("1200 MiB"));
    let queued = line_with(&lines, "needs 3000 MiB on GPU 0");
    assert!(queued.contains("12s"), "{queued}");
    assert!(line_with(&lines, "model_state").contains("model llm loading -> ready (requested) on GPU 0"));
    assert!(line_with(&lines, "vramgate top").contains("mode: chat"));
    assert!(line_with(&lines, "connected: live").starts_with("connected"));
    assert!(lines.last().is_some_and(|l| l.contains("l load") && l.contains("q quit")));
}

#[test]
fn the_selection_moves_with_the_keys_and_survives_a_refresh() {
    let mut state = connected();
    assert_eq!(state.press(Key::Down), Outcome::Stay);
    let lines = screen(&state, 120, 40);
    assert!(model_row(&lines, "vision").contains('▶'));
    assert!(!model_row(&lines, "llm").contains('▶'));
    // The last row stays selected on more downs; up goes back.
    state.press(Key::Down);
    assert_eq!(state.selected.as_deref(), Some("vision"));
    state.press(Key::Up);
    assert_eq!(state.selected.as_deref(), Some("llm"));

    // Selected by id: a refresh that reorders the rows keeps it; one without it picks the first.
    state.press(Key::Down);
    let mut reordered = status();
    reordered.models.reverse();
    state.apply(Update::Status(Box::new(reordered), Vec::new()));
    assert_eq!(state.selected.as_deref(), Some("vision"));
    let mut without = status();
    without.models.retain(|m| m.id != "vision");
    state.apply(Update::Status(Box::new(without), Vec::new()));
    assert_eq!(state.selected.as_deref(), Some("llm"));
}

#[test]
fn load_and_unload_ask_for_the_selected_model_while_connected() {
    let mut state = connected();
    state.press(Key::Down);
    assert_eq!(state.press(Key::Load), Outcome::Send(Request::Load("vision".to_string())));
    assert!(line_with(&screen(&state, 120, 40), "loading vision…").contains("q quit"));
    assert_eq!(state.press(Key::Unload), Outcome::Send(Request::Unload("vision".to_string())));

    state.apply(Update::Lost("connection refused".to_string()));
    assert_eq!(state.press(Key::Load), Outcome::Stay, "nothing is sent to a daemon that is away");
    assert!(state.notice.as_ref().is_some_and(|n| n.failed && n.text.contains("cannot reach")));
    assert_eq!(TopState::new(URL, now()).press(Key::Load), Outcome::Stay, "no model, nothing to load");
}

#[test]
fn the_mode_picker_lists_the_modes_and_applies_the_one_picked() {
    let mut state = connected();
    assert_eq!(state.press(Key::Mode), Outcome::Stay);
    let lines = screen(&state, 120, 40);
    line_with(&lines, "▶ chat (current)");
    line_with(&lines, "Enter applies, Esc closes");
    // In the picker the arrows move its cursor, not the model selection.
    state.press(Key::Down);
    assert_eq!(state.selected.as_deref(), Some("llm"));
    line_with(&screen(&state, 120, 40), "▶ vision");
    assert_eq!(state.press(Key::Enter), Outcome::Send(Request::SetMode("vision".to_string())));
    assert_eq!(state.picker, None);

    // Esc closes the picker without quitting; a second Esc quits.
    state.press(Key::Mode);
    assert_eq!(state.press(Key::Escape), Outcome::Stay);
    assert_eq!(state.picker, None);
    assert_eq!(state.press(Key::Escape), Outcome::Quit);

    let mut no_modes = connected();
    no_modes.modes.clear();
    no_modes.press(Key::Mode);
    assert_eq!(no_modes.picker, None);
    assert!(no_modes.notice.is_some_and(|n| n.text.contains("no modes")));
}

#[test]
fn a_lost_daemon_is_said_plainly_and_the_last_figures_stay() {
    let mut state = connected();
    state.apply(Update::Lost("cannot reach vramgate at http://127.0.0.1:9999: Connection refused".to_string()));
    state.now = now() + chrono::Duration::seconds(7);
    // A later failed retry keeps the outage's start.
    state.apply(Update::Lost("still refused".to_string()));
    let lines = screen(&state, 120, 40);
    assert_eq!(
        lines[1].trim_end(),
        "daemon at http://127.0.0.1:9999 unreachable: still refused; retrying (for 7s) (the figures below are from before)"
    );
    model_row(&lines, "llm");
    // A long reason wraps onto the next line rather than cutting off the end of the message.
    let reason = "cannot reach vramgate at http://127.0.0.1:9999: Connection refused (os error 111). Is `vramgate serve` running?";
    state.apply(Update::Lost(reason.to_string()));
    let lines = screen(&state, 80, 40);
    let message = lines[1..4].iter().map(|l| l.trim_end()).collect::<Vec<_>>().join(" ");
    assert!(message.contains(&format!("unreachable: {reason}; retrying (for 7s) (the figures")), "{message}");
    assert!(lines[4].starts_with("┌ Devices"), "{}", lines.join("\n"));
    state.apply(Update::Connected);
    assert_eq!(state.connection, Connection::Connected);
    assert!(screen(&state, 120, 40)[1].starts_with("connected"));

    let fresh = TopState::new(URL, now());
    assert!(screen(&fresh, 120, 40)[1].starts_with("connecting to http://127.0.0.1:9999"));
    assert_eq!(TopState::new(URL, now()).press(Key::Quit), Outcome::Quit);
}

#[test]
fn the_event_log_keeps_the_latest_and_shows_the_newest_last() {
    let mut state = connected();
    for seq in 0..(EVENTS_KEPT as u64 + 5) {
        let kind = EventKind::ModeChanged { from: None, to: format!("m{seq}") };
        state.apply(Update::Event(Box::new(Event { seq, time: now(), kind })));
    }
    assert_eq!(state.events.len(), EVENTS_KEPT);
    let lines = screen(&state, 120, 40);
    let newest = lines.iter().position(|l| l.contains(&format!("mode m{}", EVENTS_KEPT + 4)));
    let older = lines.iter().position(|l| l.contains(&format!("mode m{}", EVENTS_KEPT + 3)));
    assert!(matches!((older, newest), (Some(o), Some(n)) if o < n), "{}", lines.join("\n"));
}

#[test]
fn thresholds_are_read_where_the_status_document_carries_them() {
    let status = status();
    let mut raw = serde_json::to_value(&status).expect("serialize");
    assert!(reported_thresholds(&raw, &status).is_empty(), "none reported, none made up");
    raw["limits"] =
        serde_json::json!({ "warning_pct": 60.0, "critical_pct": 80.0, "emergency_pct": 90.0, "reserve_mib": 0 });
    let shared = Thresholds { warning_pct: 60.0, critical_pct: 80.0, emergency_pct: 90.0 };
    assert_eq!(reported_thresholds(&raw, &status), vec![(0, shared)]);
    raw["devices"][0]["thresholds"] = serde_json::json!({ "warning_pct": 50, "critical_pct": 70, "emergency_pct": 99 });
    let own = Thresholds { warning_pct: 50.0, critical_pct: 70.0, emergency_pct: 99.0 };
    assert_eq!(reported_thresholds(&raw, &status), vec![(0, own)]);
    raw["devices"][0]["thresholds"] = serde_json::json!({ "warning_pct": 90, "critical_pct": 70, "emergency_pct": 99 });
    assert_eq!(reported_thresholds(&raw, &status), vec![(0, shared)], "out of order is not drawn");

    let mut state = connected();
    state.apply(Update::Status(Box::new(status), vec![(0, own)]));
    let lines = screen(&state, 120, 40);
    let legend = line_with(&lines, "warning 50% critical 70% emergency 99%");
    assert!(!legend.contains("(defaults)"), "{legend}");
}

/// A stand-in daemon: 40 events within 200 ms on the stream (then it stays open), and a count of
/// the status reads they cause.
#[tokio::test]
async fn status_is_read_again_after_events_but_at_most_every_250_ms() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::response::sse::{Event as SseEvent, Sse};
    use axum::routing::get;
    use futures_util::StreamExt;

    const EVENTS: u64 = 40;
    let reads = Arc::new(AtomicUsize::new(0));
    let document = serde_json::to_string(&status()).expect("serialize");
    let counted = Arc::clone(&reads);
    let app = axum::Router::new()
        .route(
            "/vramgate/status",
            get(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                let body = document.clone();
                async move { ([(axum::http::header::CONTENT_TYPE, "application/json")], body) }
            }),
        )
        .route("/vramgate/mode", get(|| async { axum::Json(serde_json::json!({ "mode": null, "modes": {} })) }))
        .route(
            "/vramgate/events",
            get(|| async {
                let ticks = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(
                    std::time::Duration::from_millis(5),
                ));
                let events = ticks.zip(futures_util::stream::iter(0..EVENTS)).map(|(_, seq)| {
                    let kind = EventKind::VramChanged { device: 0, used_mib: seq, previous_mib: 0, free_mib: 0 };
                    let json = serde_json::to_string(&Event { seq, time: Utc::now(), kind }).expect("serialize");
                    Ok::<_, std::convert::Infallible>(SseEvent::default().data(json))
                });
                Sse::new(events.chain(futures_util::stream::pending()))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let (updates_tx, mut updates) = tokio::sync::mpsc::unbounded_channel();
    let client = crate::client::Client::new(&url).expect("client");
    let follower = tokio::spawn(super::feed::follow(client, updates_tx));
    // Until every event arrived and a status read came after the last one.
    let mut events = 0;
    let mut read_after_last = false;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !read_after_last {
        let update = tokio::time::timeout_at(deadline, updates.recv()).await.expect("the feed went quiet");
        match update.expect("the feed ended") {
            Update::Event(_) => events += 1,
            Update::Status(..) => read_after_last = events == EVENTS,
            Update::Lost(error) => panic!("lost the stand-in: {error}"),
            _ => {}
        }
    }
    follower.abort();
    server.abort();
    // One read on connecting, then one per 250 ms at most over ~200 ms of events and the read
    // after the last: 3, 4 with room for a slow machine (40 would be one per event).
    let reads = reads.load(Ordering::SeqCst);
    assert!((2..=4).contains(&reads), "{reads} status reads for {EVENTS} events");
}
