// The vramgate dashboard. Plain JavaScript over the daemon's own API:
//   - /vramgate/events (server-sent events, read with fetch() so the token travels in a header),
//   - /vramgate/status, fetched when an event says something changed, at most once a second,
//   - /vramgate/history, for the timelines (the same throttle, and every few seconds while quiet).
// Everything the page keeps is capped (samples, markers, log lines), so a tab left open for a
// week holds as much as one open for an hour.
"use strict";

const API = "/vramgate";
const STATUS_MIN_GAP_MS = 1000; // never ask for the status more often than this
const HISTORY_QUIET_REFRESH_MS = 5000; // the timeline moves on even when nothing happens
const MAX_LOG_LINES = 200;
const MAX_MARKERS = 500;
const MAX_SAMPLES = 4000; // the daemon keeps 3900
const WINDOWS = [[300, "5 min"], [900, "15 min"], [1800, "30 min"], [3600, "1 h"]];
const PALETTE = ["#1e88e5", "#43a047", "#8e24aa", "#f4511e", "#00897b", "#c0ca33", "#5e35b1", "#d81b60",
  "#3949ab", "#6d4c41", "#00acc1", "#fb8c00"];
const KIND_COLOURS = { lease: "#546e7a", foreign: "#757575", consumer: "#8d6e63", other: "#9e9e9e" };
const TOKEN_KEY = "vramgate.token";

const page = {
  token: sessionStorage.getItem(TOKEN_KEY) || localStorage.getItem(TOKEN_KEY) || "",
  status: null,
  limits: null,
  capacitySeconds: 3600,
  samples: [],
  markers: [], // {time (s), device or null, kind, text}
  windowSeconds: 900,
  leaseSeen: new Map(), // lease id -> grant time (ms), from events; status does not carry it
  modelColours: new Map(),
  charts: new Map(), // device index -> {plot, keys, el}
  lastStatusAt: 0,
  statusTimer: null,
  statusInFlight: false,
  onToken: null, // resumes the event stream once a token is entered
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "style") node.style.cssText = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function mib(n) {
  if (n === null || n === undefined) return "–";
  return n >= 10240 ? (n / 1024).toFixed(1) + " GiB" : n + " MiB";
}

function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return seconds + " s";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min " + (seconds % 60) + " s";
  return Math.floor(seconds / 3600) + " h " + Math.floor((seconds % 3600) / 60) + " min";
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// ---- HTTP ---------------------------------------------------------------------------------

async function api(path, options) {
  const headers = Object.assign({ Accept: "application/json" }, (options && options.headers) || {});
  if (page.token) headers.Authorization = "Bearer " + page.token;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    askForToken(page.token ? "The token was refused; enter it again." : null);
    throw new Error("the daemon needs its token");
  }
  let body = null;
  const text = await response.text();
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = text; }
  if (!response.ok) {
    const message = body && body.error ? (body.error.message || body.error) : response.status + " " + text;
    throw new Error(message);
  }
  return body;
}

function askForToken(note) {
  const form = $("token-form");
  form.hidden = false;
  if (note) showError(note);
  $("token").focus();
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  page.token = $("token").value.trim();
  const store = $("token-remember").checked ? localStorage : sessionStorage;
  store.setItem(TOKEN_KEY, page.token);
  $("token-form").hidden = true;
  showError("");
  // The event stream waits for the token after a 401; the rest is asked again now.
  if (page.onToken) { const resume = page.onToken; page.onToken = null; resume(); }
  refreshMode();
  requestStatus();
});

// ---- the event stream ---------------------------------------------------------------------

function setConnection(state, text) {
  const badge = $("connection");
  badge.dataset.state = state;
  badge.textContent = text;
}

// Reads the SSE stream with fetch(), which (unlike EventSource) can send the token as a header,
// so it never appears in a URL or a log. Reconnects with a growing delay, and refetches the whole
// status on each (re)connection, since events may have been missed meanwhile.
async function streamEvents() {
  let delay = 500;
  for (;;) {
    try {
      const headers = { Accept: "text/event-stream" };
      if (page.token) headers.Authorization = "Bearer " + page.token;
      const response = await fetch(API + "/events", { headers, cache: "no-store" });
      if (response.status === 401) {
        askForToken(null);
        setConnection("down", "needs token");
        await new Promise((resolve) => { page.onToken = resolve; });
        continue;
      }
      if (!response.ok || !response.body) throw new Error("the event stream answered " + response.status);
      setConnection("live", "live");
      delay = 500;
      requestStatus();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(buffer[end] === "\r" ? end + 4 : end + 2);
          const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
          if (data) {
            try { onEvent(JSON.parse(data)); } catch (e) { console.warn("bad event", e, data); }
          }
        }
        // A runaway line without an end would otherwise grow forever.
        if (buffer.length > 1 << 20) buffer = "";
      }
      setConnection("down", "reconnecting…");
    } catch (e) {
      setConnection("down", "daemon unreachable; retrying");
    }
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 10000);
  }
}

function onEvent(event) {
  const time = Date.parse(event.time) / 1000;
  const marker = markerOf(event);
  if (marker) {
    page.markers.push(Object.assign({ time }, marker));
    if (page.markers.length > MAX_MARKERS) page.markers.splice(0, page.markers.length - MAX_MARKERS);
  }
  if (event.type === "lease_granted") page.leaseSeen.set(event.id, Date.parse(event.time));
  if (event.type === "lease_released") page.leaseSeen.delete(event.id);
  logEvent(event);
  requestStatus();
}

// Which events mark the timeline: loads, evictions (with their reason), pressure, mode changes.
function markerOf(event) {
  if (event.type === "model_state") {
    if (event.to === "ready" && event.from === "loading") return { device: event.device, kind: "load", text: "loaded " + event.model };
    if (event.to === "unloading") {
      const evicted = /^(evicted_for:|pressure|resident_cap)/.test(event.reason);
      return {
        device: event.device,
        kind: evicted ? "eviction" : "load",
        text: (evicted ? "evicted " : "unloaded ") + event.model + " (" + event.reason + ")",
      };
    }
  }
  if (event.type === "level_changed") return { device: event.device, kind: "pressure", text: event.from + " → " + event.to };
  if (event.type === "mode_changed") return { device: null, kind: "mode", text: "mode " + event.to };
  return null;
}

function describe(event) {
  switch (event.type) {
    case "model_state": {
      let line = event.model + ": " + event.from + " → " + event.to + " (" + event.reason + ")";
      if (event.reason.startsWith("evicted_for:")) line += ": evicted to make room for " + event.reason.slice(12);
      if (event.reason === "pressure") line += ": released because the GPU reached its emergency level";
      if (event.error) line += ": " + event.error;
      return line;
    }
    case "level_changed":
      return "GPU " + event.device + ": " + event.from + " → " + event.to + " (" + mib(event.used_mib) + " of " + mib(event.total_mib) + ")";
    case "queued": return event.requester + " waits: " + event.reason;
    case "lease_granted": return "lease " + event.id + " granted to " + event.holder + ": " + mib(event.vram_mib) + (event.device !== null ? " on GPU " + event.device : "");
    case "lease_released": return "lease " + event.id + " of " + event.holder + " ended (" + event.reason + ")";
    case "mode_changed": return "mode " + (event.from || "(none)") + " → " + event.to;
    case "model_placed": return event.model + " now on " + event.placement + " (" + event.reason + ")";
    case "memory_release_timeout": return event.model + ": its memory did not come back within " + event.waited_ms + " ms";
    case "probe_failed": return "probe " + event.probe + " failed: " + event.error;
    case "probe_recovered": return "probe " + event.probe + " works again after " + event.failed_samples + " failed samples";
    case "external_attachment": return event.holder + " " + event.change + " (" + event.model + ")";
    case "external_unresponsive": return event.model + ": no acknowledgement of " + event.action + " within " + event.waited_ms + " ms";
    case "ollama_reachability": return "Ollama " + event.url + (event.reachable ? " answers again" : " does not answer: " + (event.error || ""));
    case "leftover_reaped": return "stopped leftover pid " + event.pid + " of " + event.model;
    case "events_lost": return event.count + " events lost (the page fell behind); the status was refetched";
    default: return event.type;
  }
}

function logEvent(event) {
  if (event.type === "vram_changed") return; // the bars and the timeline show these
  const warn = event.type === "probe_failed" || event.type === "memory_release_timeout" ||
    (event.type === "model_state" && (event.to === "failed" || event.reason === "crashed" || event.to === "unloading" && event.reason !== "requested" && event.reason !== "idle")) ||
    (event.type === "level_changed" && event.to !== "ok");
  const log = $("log");
  const when = new Date(event.time);
  log.prepend(el("li", { class: warn ? "warn" : null, "data-type": event.type },
    el("time", { datetime: event.time, text: when.toLocaleTimeString() }), describe(event)));
  while (log.childElementCount > MAX_LOG_LINES) log.lastElementChild.remove();
}

// ---- status and history -------------------------------------------------------------------

// Asks for the status now, or as soon as a second has passed since the last time: a burst of
// events costs one request.
function requestStatus() {
  if (page.statusTimer) return;
  const wait = Math.max(0, page.lastStatusAt + STATUS_MIN_GAP_MS - Date.now());
  page.statusTimer = setTimeout(refresh, wait);
}

async function refresh() {
  if (page.statusInFlight) { page.statusTimer = setTimeout(refresh, STATUS_MIN_GAP_MS); return; }
  page.statusInFlight = true;
  page.lastStatusAt = Date.now();
  try {
    const [status] = await Promise.all([api(API + "/status"), refreshHistory()]);
    page.status = status;
    showError("");
    render();
  } catch (e) {
    showError("Cannot read the daemon's status: " + e.message);
  } finally {
    page.statusInFlight = false;
    page.statusTimer = null;
  }
}

async function refreshHistory() {
  const newest = page.samples.length ? page.samples[page.samples.length - 1].time : null;
  const since = newest ? encodeURIComponent(newest) : String(page.capacitySeconds);
  const history = await api(API + "/history?since=" + since);
  page.limits = history.limits;
  page.capacitySeconds = Math.max(60, Math.floor((history.capacity * Math.max(history.interval_ms, 1000)) / 1000));
  for (const sample of history.samples) {
    // The newest sample may have been replaced by a later one of the same second.
    sample.t = Date.parse(sample.time) / 1000;
    const last = page.samples[page.samples.length - 1];
    if (last && Math.floor(last.t) === Math.floor(sample.t)) page.samples.pop();
    page.samples.push(sample);
  }
  if (page.samples.length > MAX_SAMPLES) page.samples.splice(0, page.samples.length - MAX_SAMPLES);
}

async function refreshMode() {
  try {
    const mode = await api(API + "/mode");
    const select = $("mode");
    const names = Object.keys(mode.modes || {});
    select.replaceChildren(el("option", { value: "", text: "(none)" }), ...names.map((n) => el("option", { value: n, text: n })));
    select.value = mode.mode || "";
    select.disabled = names.length === 0;
    select.title = names.length ? "apply a mode ([modes] in the config)" : "no [modes] in the config";
  } catch (e) {
    showError("Cannot read the modes: " + e.message);
  }
}

$("mode").addEventListener("change", async (event) => {
  const mode = event.target.value;
  if (!mode) return;
  try {
    await api(API + "/mode", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ mode }) });
  } catch (e) {
    showError("Mode " + mode + " was not applied: " + e.message);
  }
  refreshMode();
});

// ---- colours and owners -------------------------------------------------------------------

function colourOf(kind, id) {
  if (kind !== "model") return KIND_COLOURS[kind] || KIND_COLOURS.other;
  if (!page.modelColours.has(id)) page.modelColours.set(id, PALETTE[page.modelColours.size % PALETTE.length]);
  return page.modelColours.get(id);
}

// Who holds what on a device now, the same way the daemon's history counts it.
function ownersNow(status, device) {
  const owners = new Map();
  const add = (kind, id, amount) => {
    const key = kind + ":" + id;
    const entry = owners.get(key) || { kind, id, mib: 0 };
    entry.mib += amount || 0;
    owners.set(key, entry);
  };
  for (const p of device.processes || []) {
    if (p.model) {
      const model = status.models.find((m) => m.id === p.model);
      add("model", p.model, p.used_mib !== null ? p.used_mib : model ? model.vram_mib : 0);
    } else add("foreign", p.name, p.used_mib);
  }
  for (const c of device.named_consumers || []) add("consumer", c.name, c.used_mib);
  for (const m of status.models) {
    const holds = m.state === "ready" || m.state === "unloading";
    if (m.device === device.index && holds && m.placement !== "cpu" && !owners.has("model:" + m.id)) add("model", m.id, m.vram_mib);
  }
  for (const l of status.leases) if (l.device === device.index) add("lease", l.holder, l.vram_mib);
  const order = { model: 0, lease: 1, foreign: 2, consumer: 3 };
  return [...owners.values()].sort((a, b) => order[a.kind] - order[b.kind] || a.id.localeCompare(b.id));
}

// ---- rendering ----------------------------------------------------------------------------

function render() {
  const status = page.status;
  if (!status) return;
  $("version").textContent = "v" + status.version + " · " + status.probe;
  const degraded = $("degraded");
  degraded.hidden = !status.degraded;
  degraded.textContent = "degraded";
  degraded.title = (status.degraded_reasons || []).join("\n");
  for (const m of status.models) colourOf("model", m.id);
  renderDevices(status);
  renderModels(status);
  renderLeases(status);
  renderQueue(status);
  if (status.mode !== undefined && $("mode").value !== (status.mode || "")) refreshMode();
}

function renderDevices(status) {
  const container = $("devices");
  $("devices-empty").hidden = status.devices.length > 0;
  if (!status.devices.length) $("devices-empty").textContent = "No GPU: " + (status.degraded_reasons || []).join("; ");
  const seen = new Set();
  for (const device of status.devices) {
    seen.add(String(device.index));
    let card = container.querySelector('.device[data-device="' + device.index + '"]');
    if (!card) {
      card = buildDeviceCard(device);
      container.append(card);
    }
    fillDeviceCard(card, status, device);
  }
  for (const card of container.querySelectorAll(".device")) {
    if (!seen.has(card.dataset.device)) {
      const chart = page.charts.get(Number(card.dataset.device));
      if (chart) chart.plot.destroy();
      page.charts.delete(Number(card.dataset.device));
      card.remove();
    }
  }
}

function buildDeviceCard(device) {
  const select = el("select", { class: "window", "aria-label": "timeline length" });
  for (const [seconds, label] of WINDOWS) {
    if (seconds > page.capacitySeconds && seconds !== 300) continue;
    select.append(el("option", { value: seconds, text: label }));
  }
  select.value = String(page.windowSeconds);
  select.addEventListener("change", () => {
    page.windowSeconds = Number(select.value);
    for (const s of document.querySelectorAll("select.window")) s.value = select.value;
    renderTimelines();
  });
  return el("div", { class: "device", "data-device": device.index },
    el("div", { class: "device-head" },
      el("h3", { class: "device-name" }), el("span", { class: "badge level" }), el("span", { class: "numbers muted" })),
    el("div", { class: "bar", role: "img" }),
    el("div", { class: "legend" }),
    el("div", { class: "warnings muted" }),
    el("div", { class: "timeline-head" }, el("span", { text: "timeline" }), select, el("span", { class: "muted", text: "markers: loads, evictions, level changes, modes" })),
    el("div", { class: "timeline" }));
}

function fillDeviceCard(card, status, device) {
  card.querySelector(".device-name").textContent = "GPU " + device.index + " · " + device.name;
  const badge = card.querySelector(".badge.level");
  badge.className = "badge level level-" + device.level;
  badge.textContent = device.level;
  badge.dataset.level = device.level;
  card.querySelector(".numbers").textContent = mib(device.used_mib) + " used of " + mib(device.total_mib) + " · " + mib(device.free_mib) + " free · " + mib(device.usable_mib) + " usable";
  const owners = ownersNow(status, device);
  const total = Math.max(device.total_mib, 1);
  const bar = card.querySelector(".bar");
  const segments = [];
  let counted = 0;
  for (const o of owners) {
    counted += o.mib;
    segments.push(segment(o.kind, o.id, o.mib, total, o.kind === "foreign" ? o.id + " (not managed)" : o.kind === "lease" ? "lease: " + o.id : o.id));
  }
  const other = device.used_mib - Math.min(counted, device.used_mib);
  if (other > 0 && counted < device.used_mib) segments.push(segment("other", "unattributed", other, total, "used, owner unknown"));
  segments.push(segment("free", "free", Math.max(0, device.total_mib - Math.max(device.used_mib, counted)), total, "free"));
  const reserve = Math.max(0, device.total_mib - device.usable_mib);
  segments.push(el("div", { class: "reserve", title: "reserve: " + mib(reserve) + " kept free", style: "width:" + (100 * reserve / total) + "%" }));
  const limits = page.limits;
  if (limits) {
    for (const level of ["warning", "critical", "emergency"]) {
      const pct = limits[level + "_pct"];
      segments.push(el("div", { class: "threshold " + level, title: level + " at " + pct + " %", style: "left:calc(" + pct + "% - 1px)" }));
    }
  }
  bar.replaceChildren(...segments);
  bar.setAttribute("aria-label", owners.map((o) => o.id + " " + mib(o.mib)).join(", ") + ", " + mib(device.free_mib) + " free");
  const legend = card.querySelector(".legend");
  legend.replaceChildren(...owners.map((o) => el("span", null, el("span", { class: "swatch", style: "background:" + colourOf(o.kind, o.id) }), o.id + (o.kind === "model" ? "" : " (" + o.kind + ")") + " " + mib(o.mib))),
    el("span", null, el("span", { class: "swatch", style: "background:var(--free);border:1px solid var(--line)" }), "free " + mib(device.free_mib)),
    el("span", null, el("span", { class: "swatch reserve-swatch", style: "background:var(--reserve)" }), "reserve " + mib(reserve)));
  const warnings = [...(device.warnings || [])];
  if (device.error) warnings.unshift("not answering: " + device.error);
  card.querySelector(".warnings").textContent = warnings.join(" · ");
  renderTimeline(card, device.index);
}

function segment(kind, id, amount, total, title) {
  const pct = (100 * amount) / total;
  const node = el("div", { class: "seg", "data-kind": kind, "data-id": id, "data-mib": amount, title: title + ": " + mib(amount),
    style: "width:" + pct + "%;" + (kind === "free" ? "" : "background-color:" + colourOf(kind, id)) });
  if (pct > 6) node.textContent = (kind === "free" ? "free " : id + " ") + mib(amount);
  return node;
}

function renderTimelines() {
  for (const card of document.querySelectorAll(".device")) renderTimeline(card, Number(card.dataset.device));
}

// The stacked timeline of one device: each owner's MiB stacked in the bar's order, the level
// boundaries as dashed lines, and the markers as labelled lines in the DOM over the chart.
function renderTimeline(card, index) {
  if (typeof uPlot === "undefined") return;
  const holder = card.querySelector(".timeline");
  const end = Date.now() / 1000;
  const start = end - page.windowSeconds;
  const samples = page.samples.filter((s) => s.t >= start);
  const keys = [];
  const seen = new Set();
  let total = 0;
  for (const s of samples) {
    for (const d of s.devices) if (d.index === index) total = Math.max(total, d.total_mib);
    for (const o of s.owners) {
      const key = o.kind + ":" + o.id;
      if (o.device === index && !seen.has(key)) { seen.add(key); keys.push(o); }
    }
  }
  const order = { model: 0, lease: 1, foreign: 2, consumer: 3 };
  keys.sort((a, b) => order[a.kind] - order[b.kind] || a.id.localeCompare(b.id));
  // uPlot paints series in order, each filled down to zero: the top of the stack goes first.
  const stackKeys = keys.map((k) => k.kind + ":" + k.id).reverse();
  const xs = samples.map((s) => s.t);
  const cumulative = keys.map(() => new Array(samples.length).fill(0));
  samples.forEach((s, i) => {
    let sum = 0;
    keys.forEach((k, j) => {
      const owner = s.owners.find((o) => o.device === index && o.kind === k.kind && o.id === k.id);
      sum += owner ? owner.mib : 0;
      cumulative[j][i] = sum;
    });
  });
  const used = samples.map((s) => { const d = s.devices.find((x) => x.index === index); return d ? d.used_mib : null; });
  const limits = page.limits || { warning_pct: 75, critical_pct: 90, emergency_pct: 95 };
  const line = (pct) => samples.map(() => (total * pct) / 100);
  const data = [xs, ...cumulative.slice().reverse(), used, line(limits.warning_pct), line(limits.critical_pct), line(limits.emergency_pct)];
  // The axes take the theme's text colour: a theme change rebuilds the chart, as a new owner does.
  const fg = getComputedStyle(document.body).color;
  const signature = stackKeys.join("|") + "|" + fg;
  let chart = page.charts.get(index);
  const width = Math.max(holder.clientWidth, 280);
  if (!chart || chart.signature !== signature || chart.el !== holder) {
    if (chart) chart.plot.destroy();
    const series = [{ label: "time" }];
    for (const key of stackKeys) {
      const [kind, ...rest] = key.split(":");
      const id = rest.join(":");
      const colour = colourOf(kind, id);
      series.push({ label: kind === "model" ? id : id + " (" + kind + ")", stroke: colour, fill: colour + "b0", width: 1, value: (u, v) => mib(v) });
    }
    series.push({ label: "used", stroke: fg, width: 1, dash: [2, 2], value: (u, v) => mib(v) });
    series.push({ label: "warning", stroke: "#b8860b", width: 1, dash: [6, 4], points: { show: false } });
    series.push({ label: "critical", stroke: "#d84315", width: 1, dash: [6, 4], points: { show: false } });
    series.push({ label: "emergency", stroke: "#b71c1c", width: 1, dash: [6, 4], points: { show: false } });
    const opts = {
      width, height: 180, series,
      scales: { x: { time: true }, y: { range: () => [0, Math.max(total, 1)] } },
      axes: [{ stroke: fg, grid: { stroke: "rgba(128,128,128,.15)" } }, { stroke: fg, size: 76, values: (u, vals) => vals.map((v) => mib(v)), grid: { stroke: "rgba(128,128,128,.15)" } }],
      legend: { show: true, live: true },
      cursor: { drag: { x: false, y: false } },
      hooks: { draw: [(u) => drawMarkers(u, index)] },
    };
    holder.replaceChildren();
    holder.dataset.axisColour = fg;
    chart = { plot: new uPlot(opts, data, holder), signature, el: holder, start, end };
    page.charts.set(index, chart);
  } else {
    if (Math.abs(chart.plot.width - width) > 2) chart.plot.setSize({ width, height: 180 });
  }
  chart.start = start;
  chart.end = end;
  chart.plot.setData(data, false);
  chart.plot.setScale("x", { min: start, max: end });
}

function drawMarkers(u, index) {
  let layer = u.over.querySelector(".markers");
  if (!layer) { layer = el("div", { class: "markers" }); u.over.append(layer); }
  const min = u.scales.x.min, max = u.scales.x.max;
  const shown = page.markers.filter((m) => (m.device === null || m.device === undefined || m.device === index) && m.time >= min && m.time <= max);
  const width = u.over.clientWidth;
  layer.replaceChildren(...shown.slice(-100).map((m, i) => {
    const x = u.valToPos(m.time, "x");
    // Labels near the right edge extend to the left, so they stay readable.
    return el("div", {
      class: "marker", "data-kind": m.kind, title: new Date(m.time * 1000).toLocaleTimeString() + " " + m.text,
      style: "left:" + x + "px",
    }, el("span", { class: x > width - 160 ? "flip" : null, text: m.text, style: "top:" + ((i % 6) * 12) + "px" }));
  }));
}

function renderModels(status) {
  const body = $("models").tBodies[0];
  const rows = status.models.map((m) => {
    const colour = colourOf("model", m.id);
    const placement = m.placement ? (m.placement === "cpu" ? "CPU" : "GPU " + (m.device ?? "?")) : (m.device !== null ? "(GPU " + m.device + ")" : "–");
    const loadable = m.state === "unloaded" || m.state === "failed" || m.placement === "cpu";
    const unloadable = m.state === "ready" || m.state === "loading";
    const note = [m.last_error, m.note, m.retry_in_s ? "next try in " + duration(m.retry_in_s) : null].filter(Boolean).join(" · ");
    return el("tr", { "data-model": m.id },
      el("td", null, el("span", { class: "swatch", style: "background:" + colour }), m.id,
        m.aliases && m.aliases.length ? el("div", { class: "muted", text: "also " + m.aliases.join(", ") }) : null),
      el("td", { class: "state state-" + m.state, title: m.state_reason || "", text: m.state + (m.state_reason && m.state !== "ready" ? " (" + m.state_reason + ")" : "") }),
      el("td", { text: placement }),
      el("td", { class: "num", text: mib(m.declared_mib) + " / " + mib(m.measured_mib) }),
      el("td", { class: "num", text: String(m.in_use) }),
      el("td", { class: "num", text: String(m.priority) }),
      el("td", { text: m.pinned ? "pinned" : "" }),
      el("td", { class: "num countdown", "data-until": m.expires_at || "", text: m.expires_at ? duration((Date.parse(m.expires_at) - Date.now()) / 1000) : "–" }),
      el("td", { class: "note", text: note }),
      el("td", null,
        el("button", { type: "button", class: "load", disabled: loadable ? null : "", onclick: () => act(m.id, "load") }, "load"), " ",
        el("button", { type: "button", class: "unload", disabled: unloadable ? null : "", onclick: () => act(m.id, "unload") }, "unload")));
  });
  body.replaceChildren(...rows);
  if (!rows.length) body.append(el("tr", null, el("td", { colspan: 10, class: "muted", text: "no models in the config" })));
}

async function act(model, action) {
  for (const b of document.querySelectorAll('tr[data-model="' + CSS.escape(model) + '"] button')) b.disabled = true;
  try {
    // Load waits until the model is ready, unload until its memory is back; the events update
    // the page meanwhile.
    await api(API + "/models/" + encodeURIComponent(model) + "/" + action, { method: "POST" });
  } catch (e) {
    showError(action + " " + model + ": " + e.message);
  }
  requestStatus();
}

function renderLeases(status) {
  // Forget the grant times of leases that ended, even when their release event was missed (not
  // of one granted just now: a status fetched before its grant does not list it yet).
  const held = new Set(status.leases.map((l) => l.id));
  for (const [id, since] of page.leaseSeen) {
    if (!held.has(id) && Date.now() - since > 10000) page.leaseSeen.delete(id);
  }
  const body = $("leases").tBodies[0];
  const rows = status.leases.map((l) => {
    const granted = l.granted_at ? Date.parse(l.granted_at) : NaN;
    const since = Number.isNaN(granted) ? page.leaseSeen.get(l.id) : granted;
    return el("tr", { "data-lease": l.id },
      el("td", { text: l.holder + (l.exclusive ? " (exclusive)" : "") }),
      el("td", { text: "GPU " + l.device }),
      el("td", { class: "num", text: mib(l.vram_mib) }),
      el("td", { class: "num countdown-age", "data-since": since || "", title: since ? "" : "granted before this page opened", text: since ? duration((Date.now() - since) / 1000) : "–" }),
      el("td", { text: l.model || "" }));
  });
  body.replaceChildren(...rows);
  if (!rows.length) body.append(el("tr", null, el("td", { colspan: 5, class: "muted", text: "no leases" })));
}

function renderQueue(status) {
  const body = $("queue").tBodies[0];
  const rows = (status.queue || []).map((q) => el("tr", null,
    el("td", { text: q.requester + (q.pid ? " (pid " + q.pid + ")" : "") }),
    el("td", { text: (q.kind === "load" ? "load " + (q.model || "") : "lease") + (q.device !== null && q.device !== undefined ? " on GPU " + q.device : "") }),
    el("td", { class: "num", text: mib(q.vram_mib) }),
    el("td", { class: "num", text: String(q.priority) }),
    el("td", { class: "num countdown-age", "data-since": Date.parse(q.since), text: duration((Date.now() - Date.parse(q.since)) / 1000) }),
    el("td", { class: "note", text: q.reason || "" })));
  body.replaceChildren(...rows);
  if (!rows.length) body.append(el("tr", null, el("td", { colspan: 6, class: "muted", text: "nobody waits" })));
}

// Countdowns and ages tick locally once a second; no request is made for them.
setInterval(() => {
  for (const cell of document.querySelectorAll("td.countdown[data-until]")) {
    if (cell.dataset.until) cell.textContent = duration((Date.parse(cell.dataset.until) - Date.now()) / 1000);
  }
  for (const cell of document.querySelectorAll("td.countdown-age")) {
    if (cell.dataset.since) cell.textContent = duration((Date.now() - Number(cell.dataset.since)) / 1000);
  }
}, 1000);

// The timeline moves on while nothing happens (samples keep coming).
setInterval(() => { if (!document.hidden) requestStatus(); }, HISTORY_QUIET_REFRESH_MS);
window.addEventListener("resize", () => renderTimelines());
matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => renderTimelines());

refreshMode();
requestStatus();
streamEvents();
