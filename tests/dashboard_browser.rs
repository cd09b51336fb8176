//! The web dashboard (`/ui/`) in a real browser: Debian's headless chromium, driven over WebDriver
//! (chromedriver speaks plain HTTP and JSON, so reqwest is the whole client), against the real
//! daemon on the sim device with fake models. Every check is on the page's DOM, waited for with a
//! deadline: the devices and models render, a click on "load" makes the model's row and its bar
//! segment appear without a reload, an eviction shows as a timeline marker and a log line, and a
//! level change shows its badge. A screenshot is written to `target/test-artifacts/`.
//!
//! Needs `chromium` and `chromedriver` (`apt-get install chromium chromium-driver`; `.ci/run`
//! installs them). Without them the tests fail and say so, unless `VRAMGATE_SKIP_BROWSER=1` is
//! set outside CI (under `CI=true` they always run).

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, KillOnDrop, fake_model, sim_config};
use serde_json::{Value, json};

/// How long the browser gets to show each change (a load is 50 ms on the fake model; the rest is
/// the browser's start and the page's one-second status throttle).
const DEADLINE: Duration = Duration::from_secs(20);
/// The W3C WebDriver key of an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// chromedriver's path, or `None` when the browser tests are explicitly skipped here.
fn chromedriver() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path).map(|dir| dir.join("chromedriver")).find(|candidate| candidate.is_file())
    });
    if found.is_some() {
        return found;
    }
    let in_ci = std::env::var("CI").is_ok_and(|ci| ci == "true");
    if !in_ci && std::env::var("VRAMGATE_SKIP_BROWSER").is_ok_and(|skip| skip == "1") {
        eprintln!("skipped: no chromedriver on PATH and VRAMGATE_SKIP_BROWSER=1");
        return None;
    }
    panic!(
        "the dashboard tests need a browser: install Debian's chromium and chromedriver \
         (`apt-get install -y chromium chromium-driver`), or set VRAMGATE_SKIP_BROWSER=1 to skip them \
         outside CI"
    );
}

/// A headless chromium session; the driver (and the browser it started, in the same process
/// group) is killed when this drops, even when the test fails first.
struct Browser {
    http: reqwest::Client,
    base: String,
    _driver: DriverGroup,
}

/// Kills chromedriver's whole process group on drop: the browser processes die with it.
struct DriverGroup(KillOnDrop);

impl Drop for DriverGroup {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.pid()) {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

impl Browser {
    async fn start(driver: &std::path::Path) -> Browser {
        // A port chromedriver can take: the OS picks a free one, released just before.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let mut command = Command::new(driver);
        command.arg(format!("--port={port}")).stdout(Stdio::null()).stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let group = DriverGroup(KillOnDrop::spawn(&mut command));
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("an HTTP client");
        let url = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        loop {
            let ready = http.get(format!("{url}/status")).send().await;
            if let Ok(response) = ready
                && let Ok(body) = response.json::<Value>().await
                && body["value"]["ready"] == true
            {
                break;
            }
            assert!(started.elapsed() < DEADLINE, "chromedriver did not become ready within {DEADLINE:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut options = json!({
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                     "--disable-dev-shm-usage"]
        });
        if std::path::Path::new("/usr/bin/chromium").is_file() {
            options["binary"] = json!("/usr/bin/chromium");
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}});
        let response = http.post(format!("{url}/session")).json(&capabilities).send().await.expect("new session");
        let body: Value = response.json().await.expect("session JSON");
        let session = body["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("chromedriver did not start chromium: {body}"))
            .to_string();
        Browser { http, base: format!("{url}/session/{session}"), _driver: group }
    }

    async fn command(&self, path: &str, body: Value) -> Value {
        let response = self.http.post(format!("{}{path}", self.base)).json(&body).send().await.expect("WebDriver");
        let status = response.status();
        let body: Value = response.json().await.expect("WebDriver JSON");
        assert!(status.is_success(), "WebDriver {path}: {status}: {body}");
        body["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.command("/url", json!({"url": url})).await;
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    async fn eval(&self, script: &str) -> Value {
        self.command("/execute/sync", json!({"script": script, "args": []})).await
    }

    /// Waits until `script` returns something truthy; returns it. Fails with `what` and the page's
    /// visible text when the deadline passes.
    async fn wait_for(&self, what: &str, script: &str) -> Value {
        let started = Instant::now();
        loop {
            let value = self.eval(script).await;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64().is_some_and(|n| n != 0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return value;
            }
            if started.elapsed() > DEADLINE {
                let text = self.eval("return document.body.innerText").await;
                panic!("the page did not show {what} within {DEADLINE:?}; it shows:\n{}", text.as_str().unwrap_or(""));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Clicks the element `css` selects, as a user would (WebDriver's element click).
    async fn click(&self, css: &str) {
        let element = self.command("/element", json!({"using": "css selector", "value": css})).await;
        let id = element[ELEMENT_KEY].as_str().unwrap_or_else(|| panic!("no element {css}: {element}")).to_string();
        self.command(&format!("/element/{id}/click"), json!({})).await;
    }

    /// Writes a PNG of the window to `target/test-artifacts/NAME` and returns its path.
    async fn screenshot(&self, name: &str) -> PathBuf {
        let response = self.http.get(format!("{}/screenshot", self.base)).send().await.expect("screenshot");
        let body: Value = response.json().await.expect("screenshot JSON");
        let png = base64_decode(body["value"].as_str().expect("a base64 PNG"));
        assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).parent().expect("target/").join("test-artifacts");
        std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
        let path = dir.join(name);
        std::fs::write(&path, png).expect("write the screenshot");
        path
    }

    async fn close(self) {
        let _ = self.http.delete(&self.base).send().await;
    }
}

/// Standard base64 (what WebDriver's screenshot is), without a crate for twenty lines.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut buffer = 0u32;
    let mut bits = 0;
    for sextet in text.bytes().filter_map(value) {
        // Only the bits not yet written out are kept (at most 14).
        buffer = ((buffer << 6) | u32::from(sextet)) & 0x3fff;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    out
}

/// One 8 GiB sim GPU with `llm` (5000 MiB) and `vision` (4000 MiB): both never fit together.
fn start_daemon(server: &str) -> Daemon {
    Daemon::start(|sim| {
        format!(
            "{server}{}{}{}",
            sim_config(sim, 8192, "100ms", ""),
            fake_model(sim, "llm", 5000, "", ""),
            fake_model(sim, "vision", 4000, "", "")
        )
    })
}

#[tokio::test]
async fn the_dashboard_shows_loads_evictions_and_levels_live() {
    let Some(driver) = chromedriver() else { return };
    let daemon = start_daemon("");
    let browser = Browser::start(&driver).await;
    // A browser asking for `/` is sent to the dashboard.
    browser.open(&format!("{}/", daemon.url)).await;
    let path = browser.eval("return location.pathname").await;
    assert_eq!(path, "/ui/", "GET / from a browser redirects to the dashboard");

    // The device, with its bar, badge and timeline chart, and every model's row.
    browser
        .wait_for(
            "GPU 0 with its bar, badge and timeline",
            r#"const card = document.querySelector('.device[data-device="0"]');
               return card && card.querySelector('.device-name').textContent.includes('Sim Test')
                 && card.querySelector('.badge.level').dataset.level === 'ok'
                 && card.querySelector('.bar .seg[data-kind="free"]') !== null
                 && card.querySelectorAll('.bar .threshold').length === 3
                 && card.querySelector('.timeline canvas') !== null
                 && getComputedStyle(document.getElementById('token-form')).display === 'none'"#,
        )
        .await;
    browser
        .wait_for(
            "both models, unloaded",
            r#"const state = (id) => document.querySelector(`tr[data-model="${id}"] td.state`);
               return state('llm') && state('vision') && state('llm').textContent.startsWith('unloaded')
                 && state('vision').textContent.startsWith('unloaded')"#,
        )
        .await;
    assert_eq!(browser.eval("return document.querySelectorAll('.bar .seg[data-kind=\"model\"]').length").await, 0);
    let url_before = browser.eval("return performance.timeOrigin").await;

    // Load: the row turns ready and the model's segment appears, without a reload.
    browser.click(r#"tr[data-model="llm"] button.load"#).await;
    browser
        .wait_for(
            "llm ready, with its segment on the bar",
            r#"const seg = document.querySelector('.device[data-device="0"] .bar .seg[data-kind="model"][data-id="llm"]');
               return document.querySelector('tr[data-model="llm"] td.state').textContent === 'ready'
                 && seg !== null && Number(seg.dataset.mib) >= 5000"#,
        )
        .await;

    // A level change: a foreign consumer takes the GPU to 79 % (warning at 75 %).
    daemon.claim("desktop", 1500);
    browser
        .wait_for(
            "the warning badge and the consumer on the bar",
            r#"const card = document.querySelector('.device[data-device="0"]');
               return card.querySelector('.badge.level').textContent === 'warning'
                 && card.querySelector('.bar .seg[data-kind="consumer"][data-id="desktop"]') !== null"#,
        )
        .await;

    // An eviction: vision needs 4000 MiB, so llm goes; the timeline marks it and the log says why.
    browser.click(r#"tr[data-model="vision"] button.load"#).await;
    let marker = browser
        .wait_for(
            "an eviction marker on the timeline",
            r#"const m = [...document.querySelectorAll('.device[data-device="0"] .timeline .marker[data-kind="eviction"]')];
               return m.map((x) => x.textContent).find((t) => t.includes('llm') && t.includes('evicted_for:vision'))"#,
        )
        .await;
    assert!(marker.as_str().is_some_and(|m| m.starts_with("evicted llm")), "{marker}");
    browser
        .wait_for(
            "the eviction in the log, with its reason",
            r#"return [...document.querySelectorAll('#log li')].some((li) =>
                 li.textContent.includes('llm: ready → unloading (evicted_for:vision)')
                 && li.textContent.includes('to make room for vision'))"#,
        )
        .await;
    browser
        .wait_for(
            "vision ready and llm unloaded",
            r#"const state = (id) => document.querySelector(`tr[data-model="${id}"] td.state`).textContent;
               return state('vision') === 'ready' && state('llm').startsWith('unloaded')
                 && document.querySelector('.bar .seg[data-kind="model"][data-id="llm"]') === null"#,
        )
        .await;
    assert_eq!(browser.eval("return performance.timeOrigin").await, url_before, "the page was never reloaded");
    // A lease: its row (holder, size, an age counted from its grant) and its segment on the bar.
    let (code, lease) =
        daemon.post("/vramgate/leases", json!({"vram": "1000MiB", "holder": "trainer", "ttl": "60s"})).await;
    assert_eq!(code, 201, "{lease}");
    browser
        .wait_for(
            "the lease in its table and on the bar",
            r#"const row = document.querySelector('#leases tr[data-lease]');
               return row && row.textContent.includes('trainer') && row.textContent.includes('1000 MiB')
                 && /\d+ s/.test(row.querySelector('.countdown-age').textContent)
                 && document.querySelector('.bar .seg[data-kind="lease"][data-id="trainer"]') !== null"#,
        )
        .await;

    // The same colour for a model everywhere on the page: its row's swatch and its bar segment.
    let colours = browser
        .eval(
            r#"const colour = (css) => getComputedStyle(document.querySelector(css)).backgroundColor;
               return [colour('tr[data-model="vision"] .swatch'), colour('.bar .seg[data-id="vision"]')]"#,
        )
        .await;
    assert_eq!(colours[0], colours[1], "one colour per model: {colours}");

    // The status is fetched when events say something changed, never more than once a second.
    let gaps = browser
        .eval(
            r#"const starts = performance.getEntriesByType('resource')
                 .filter((r) => r.name.includes('/vramgate/status')).map((r) => r.startTime);
               return starts.slice(1).map((t, i) => t - starts[i])"#,
        )
        .await;
    let gaps: Vec<f64> = gaps.as_array().expect("gaps").iter().filter_map(Value::as_f64).collect();
    assert!(gaps.len() >= 3, "the status was fetched as events came: {gaps:?}");
    // A timer may fire a millisecond early against the performance clock.
    assert!(gaps.iter().all(|gap| *gap >= 990.0), "status fetches less than a second apart: {gaps:?}");

    // The page's weight: every byte its first load transferred (HTML, script, styles, uPlot).
    let weight = browser
        .eval(
            r#"const files = performance.getEntriesByType('resource').filter((r) => r.name.includes('/ui/'));
               const page = performance.getEntriesByType('navigation')[0];
               return {files: files.length, bytes: files.reduce((n, r) => n + r.transferSize, page.transferSize),
                       decoded: files.reduce((n, r) => n + r.decodedBodySize, page.decodedBodySize)}"#,
        )
        .await;
    println!("dashboard page weight: {weight}");
    assert_eq!(weight["files"], 4, "app.js, app.css, uPlot's script and style: {weight}");
    assert!(weight["decoded"].as_u64().is_some_and(|b| b > 50_000 && b < 200_000), "{weight}");

    let screenshot = browser.screenshot("dashboard.png").await;
    println!("dashboard screenshot: {}", screenshot.display());

    // Dark theme: the system's preference is followed.
    let dark = json!({"cmd": "Emulation.setEmulatedMedia",
                      "params": {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}});
    browser.command("/goog/cdp/execute", dark).await;
    browser
        .wait_for(
            "a dark background",
            r#"const [r, g, b] = getComputedStyle(document.body).backgroundColor.match(/\d+/g).map(Number);
               const axes = document.querySelector('.timeline').dataset.axisColour;
               return r + g + b < 150 && axes === getComputedStyle(document.body).color"#,
        )
        .await;
    println!("dashboard screenshot: {}", browser.screenshot("dashboard-dark.png").await.display());

    // A phone's width: nothing runs off the side of the page (wide tables scroll in their box).
    browser.command("/window/rect", json!({"width": 390, "height": 844})).await;
    browser
        .wait_for(
            "the page fitting a phone's width",
            r#"return innerWidth < 500 && document.documentElement.scrollWidth <= innerWidth
                 && document.querySelector('.timeline canvas').getBoundingClientRect().right <= innerWidth"#,
        )
        .await;
    println!("dashboard screenshot: {}", browser.screenshot("dashboard-phone.png").await.display());
    browser.close().await;
}

#[tokio::test]
async fn with_a_token_the_dashboard_asks_for_it_once_and_streams_with_it() {
    let Some(driver) = chromedriver() else { return };
    let daemon = start_daemon("[server]\ntoken = \"dashboard-secret\"\n");
    let browser = Browser::start(&driver).await;
    browser.open(&format!("{}/ui/", daemon.url)).await;
    let form_shown = "return getComputedStyle(document.getElementById('token-form')).display !== 'none'";
    browser.wait_for("the token form", form_shown).await;
    assert_eq!(
        browser.eval("return document.querySelectorAll('.device').length").await,
        0,
        "no data without the token"
    );
    browser
        .eval("document.getElementById('token').value = 'dashboard-secret'; document.getElementById('token-form').requestSubmit(); return true")
        .await;
    browser
        .wait_for(
            "the device and a live event stream",
            r#"return document.querySelector('.device[data-device="0"] .badge.level') !== null
                 && document.getElementById('connection').dataset.state === 'live'
                 && getComputedStyle(document.getElementById('token-form')).display === 'none'"#,
        )
        .await;
    // The stream carries the token in a header: a load's events reach the page.
    browser.click(r#"tr[data-model="llm"] button.load"#).await;
    browser
        .wait_for(
            "llm's load in the log",
            r#"return [...document.querySelectorAll('#log li')].some((li) => li.textContent.includes('llm: loading → ready'))"#,
        )
        .await;
    let stored = browser.eval("return sessionStorage.getItem('vramgate.token')").await;
    assert_eq!(stored, "dashboard-secret", "kept for this tab, not asked again on a reload");
    browser.close().await;
}
