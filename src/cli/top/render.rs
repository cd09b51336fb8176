//! Draws `vramgate top` from a [`TopState`] and nothing else, so a test can draw any screen on
//! ratatui's `TestBackend` and read it back.

use chrono::{DateTime, Utc};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Clear, Paragraph, Row, Table, TableState};

use super::state::{Connection, TopState};
use crate::gpu::{Level, Thresholds};
use crate::status::{DeviceStatus, ModelStatus, Status};

/// Each model's colour, by its row: the same on the bars and in the table.
const PALETTE: [Color; 8] = [
    Color::Cyan,
    Color::Green,
    Color::Blue,
    Color::Magenta,
    Color::LightYellow,
    Color::LightCyan,
    Color::LightGreen,
    Color::LightMagenta,
];
/// The bar cell for a model's memory, for memory in use by anything else, and free memory.
const MODEL_CELL: char = '█';
/// A model's colour swatch in the legend and the table.
const SWATCH: char = '■';
const OTHER_CELL: char = '▒';
const FREE_CELL: char = '░';
/// The bar cell where a threshold lies.
const THRESHOLD_CELL: char = '│';
/// The keys, as the footer lists them.
const KEYS: &str = "↑/↓ j/k select · l load · u unload · m mode · q quit";

/// Draws the whole screen.
pub(crate) fn draw(frame: &mut Frame, state: &TopState) {
    let devices = state.status.as_ref().map_or(0, |s| s.devices.len());
    // Three lines a device (heading, bar, legend), at least one for "no GPU".
    let device_lines = u16::try_from(devices.max(1) * 3).unwrap_or(u16::MAX);
    let models = u16::try_from(state.models().len()).unwrap_or(u16::MAX);
    // The connection line wraps: a lost daemon's reason is long, and its end ("retrying") matters.
    let area = frame.area();
    let connection_text = wrap(connection_line(state), area.width, 3);
    let connection_lines = connection_text.len().max(1);
    let [header, connection, devices_area, models_area, lower, events_area, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(u16::try_from(connection_lines).unwrap_or(1)),
        Constraint::Length(device_lines.saturating_add(2)),
        Constraint::Min(models.saturating_add(3).min(12)),
        Constraint::Length(6),
        Constraint::Min(4),
        Constraint::Length(1),
    ])
    .areas(area);
    frame.render_widget(Paragraph::new(header_line(state)), header);
    frame.render_widget(Paragraph::new(connection_text), connection);
    draw_devices(frame, state, devices_area);
    draw_models(frame, state, models_area);
    let [leases_area, queue_area] =
        Layout::horizontal([Constraint::Percentage(40), Constraint::Percentage(60)]).areas(lower);
    draw_leases(frame, state, leases_area);
    draw_queue(frame, state, queue_area);
    draw_events(frame, state, events_area);
    frame.render_widget(Paragraph::new(footer_line(state)), footer);
    if state.picker.is_some() {
        draw_picker(frame, state);
    }
}

fn header_line(state: &TopState) -> Line<'static> {
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let mut spans = vec![Span::styled("vramgate top", bold), Span::raw(format!("  {}", state.url))];
    if let Some(status) = &state.status {
        let mode = status.mode.as_deref().unwrap_or("none");
        spans.push(Span::raw(format!("  mode: {mode}  daemon {}  probe {}", status.version, status.probe.as_str())));
        if status.degraded {
            spans.push(Span::styled(
                format!("  degraded: {}", status.degraded_reasons.join("; ")),
                Style::new().fg(Color::Red),
            ));
        }
    }
    Line::from(spans)
}

/// The second line: connected, connecting, or the daemon is gone and why.
pub(crate) fn connection_line(state: &TopState) -> Line<'static> {
    match &state.connection {
        Connection::Connecting => Line::styled(format!("connecting to {}…", state.url), Style::new().fg(Color::Yellow)),
        Connection::Connected => Line::styled("connected: live from the event stream", Style::new().fg(Color::Green)),
        Connection::Lost { error, since } => {
            let figures = if state.status.is_some() { " (the figures below are from before)" } else { "" };
            Line::styled(
                format!(
                    "daemon at {} unreachable: {error}; retrying (for {}){figures}",
                    state.url,
                    age(*since, state.now)
                ),
                Style::new().fg(Color::White).bg(Color::Red).add_modifier(Modifier::BOLD),
            )
        }
    }
}

/// A one-style line wrapped at spaces into lines of at most `width` characters (a longer word is
/// cut), at most `most` of them.
fn wrap(line: Line<'static>, width: u16, most: usize) -> Vec<Line<'static>> {
    let width = usize::from(width.max(1));
    let text: String = line.spans.iter().map(|s| s.content.as_ref()).collect();
    let mut lines: Vec<String> = Vec::new();
    let mut current = String::new();
    for word in text.split(' ') {
        let length = current.chars().count();
        if length > 0 && length + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(word);
        while current.chars().count() > width {
            lines.push(current.chars().take(width).collect());
            current = current.chars().skip(width).collect();
        }
    }
    lines.push(current);
    lines.into_iter().take(most).map(|text| Line::styled(text, line.style)).collect()
}

fn draw_devices(frame: &mut Frame, state: &TopState, area: Rect) {
    let block = Block::bordered().title(" Devices ");
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let Some(status) = &state.status else {
        frame.render_widget(Paragraph::new("no status yet"), inner);
        return;
    };
    if status.devices.is_empty() {
        frame.render_widget(Paragraph::new("no GPU: vramgate monitors nothing on this machine"), inner);
        return;
    }
    let mut lines = Vec::new();
    for device in &status.devices {
        let (thresholds, reported) = state.thresholds_of(device.index);
        lines.push(device_heading(device));
        lines.push(bar(status, device, thresholds, inner.width));
        lines.push(legend(status, device, thresholds, reported));
    }
    frame.render_widget(Paragraph::new(lines), inner);
}

fn level_style(level: Level) -> Style {
    let color = match level {
        Level::Ok => Color::Green,
        Level::Warning => Color::Yellow,
        Level::Critical => Color::Red,
        Level::Emergency => Color::Magenta,
    };
    Style::new().fg(Color::Black).bg(color).add_modifier(Modifier::BOLD)
}

fn device_heading(device: &DeviceStatus) -> Line<'static> {
    let percent = if device.total_mib == 0 { 0.0 } else { device.used_mib as f64 * 100.0 / device.total_mib as f64 };
    let mut spans = vec![
        Span::styled(format!("GPU {} ", device.index), Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(format!("{}  ", device.name)),
        Span::styled(format!(" {} ", device.level.as_str().to_uppercase()), level_style(device.level)),
        Span::raw(format!(
            "  {} / {} MiB used ({percent:.1}%), {} MiB free, {} usable",
            device.used_mib, device.total_mib, device.free_mib, device.usable_mib
        )),
    ];
    if let Some(util) = device.utilization_pct {
        spans.push(Span::raw(format!(", {util}% busy")));
    }
    if let Some(temperature) = device.temperature_c {
        spans.push(Span::raw(format!(", {temperature}°C")));
    }
    if let Some(error) = &device.error {
        spans.push(Span::styled(format!("  reading failed: {error}"), Style::new().fg(Color::Red)));
    }
    Line::from(spans)
}

/// Who holds the memory of a device: each loaded model on it (its processes' measured memory,
/// or its footprint where no process is seen, as for Ollama's), in table order with its row.
fn model_holders(status: &Status, device: &DeviceStatus) -> Vec<(usize, u64)> {
    let loaded = |m: &ModelStatus| {
        m.device == Some(device.index)
            && m.placement.as_deref() != Some("cpu")
            && matches!(m.state.as_str(), "loading" | "ready" | "unloading")
    };
    status
        .models
        .iter()
        .enumerate()
        .filter(|(_, m)| loaded(m))
        .map(|(row, m)| {
            let seen: u64 = device
                .processes
                .iter()
                .filter(|p| p.model.as_deref() == Some(m.id.as_str()))
                .filter_map(|p| p.used_mib)
                .fold(0, u64::saturating_add);
            (row, if seen > 0 { seen } else { m.vram_mib })
        })
        .collect()
}

/// A device's memory as one line of `width` cells: each model in its colour, the rest in use,
/// free memory, and a mark where each threshold lies.
pub(crate) fn bar(status: &Status, device: &DeviceStatus, thresholds: Thresholds, width: u16) -> Line<'static> {
    let width = usize::from(width);
    let total = device.total_mib.max(1);
    // The cell where `mib` (counted from the left) ends, rounded, never past the bar.
    let cell_at = |mib: u64| -> usize {
        let cells = u128::from(mib.min(total)) * width as u128 / u128::from(total);
        usize::try_from(cells).unwrap_or(width)
    };
    let mut cells: Vec<(char, Style)> = Vec::with_capacity(width);
    let mut end_mib = 0u64;
    for (row, mib) in model_holders(status, device) {
        end_mib = end_mib.saturating_add(mib);
        let style = Style::new().fg(PALETTE[row % PALETTE.len()]);
        cells.resize(cell_at(end_mib).max(cells.len()), (MODEL_CELL, style));
    }
    let used = device.used_mib.max(end_mib);
    cells.resize(cell_at(used).max(cells.len()), (OTHER_CELL, Style::new().fg(Color::Gray)));
    cells.resize(width, (FREE_CELL, Style::new().fg(Color::DarkGray)));
    for (pct, level) in [
        (thresholds.warning_pct, Level::Warning),
        (thresholds.critical_pct, Level::Critical),
        (thresholds.emergency_pct, Level::Emergency),
    ] {
        // A threshold at 100 % marks the last cell.
        let at = ((pct / 100.0) * width as f64).floor() as usize;
        if let Some(cell) = cells.get_mut(at.min(width.saturating_sub(1))) {
            *cell = (THRESHOLD_CELL, Style::new().fg(level_style(level).bg.unwrap_or(Color::White)));
        }
    }
    Line::from(cells.into_iter().map(|(c, style)| Span::styled(c.to_string(), style)).collect::<Vec<_>>())
}

fn legend(status: &Status, device: &DeviceStatus, thresholds: Thresholds, reported: bool) -> Line<'static> {
    let mut spans = Vec::new();
    let mut held = 0u64;
    for (row, mib) in model_holders(status, device) {
        held = held.saturating_add(mib);
        let Some(model) = status.models.get(row) else { continue };
        spans.push(Span::styled(format!("{SWATCH} "), Style::new().fg(PALETTE[row % PALETTE.len()])));
        spans.push(Span::raw(format!("{} {mib}  ", model.id)));
    }
    let other = device.used_mib.saturating_sub(held);
    if other > 0 {
        spans.push(Span::raw(format!("{OTHER_CELL} other {other}  ")));
    }
    let source = if reported { "" } else { " (defaults)" };
    spans.push(Span::styled(
        format!(
            "{THRESHOLD_CELL} warning {}% critical {}% emergency {}%{source}",
            thresholds.warning_pct, thresholds.critical_pct, thresholds.emergency_pct
        ),
        Style::new().fg(Color::DarkGray),
    ));
    Line::from(spans)
}

fn draw_models(frame: &mut Frame, state: &TopState, area: Rect) {
    let header =
        Row::new(["", "MODEL", "STATE", "WHERE", "VRAM", "DECLARED", "MEASURED", "IN USE", "PRIO", "IDLE IN", "NOTE"])
            .style(Style::new().add_modifier(Modifier::BOLD));
    let rows = state.models().iter().enumerate().map(|(row, m)| model_row(row, m, state.now));
    let widths = [
        Constraint::Length(1),
        Constraint::Min(10),
        Constraint::Length(9),
        Constraint::Length(6),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(6),
        Constraint::Length(5),
        Constraint::Length(7),
        Constraint::Fill(2),
    ];
    let table = Table::new(rows, widths)
        .header(header)
        .block(Block::bordered().title(" Models "))
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .highlight_symbol("▶ ");
    let mut selection = TableState::default().with_selected(state.selected_row());
    frame.render_stateful_widget(table, area, &mut selection);
}

fn model_row(row: usize, model: &ModelStatus, now: DateTime<Utc>) -> Row<'static> {
    let state_style = match model.state.as_str() {
        "ready" => Style::new().fg(Color::Green),
        "loading" | "unloading" => Style::new().fg(Color::Yellow),
        "failed" => Style::new().fg(Color::Red),
        _ => Style::new(),
    };
    let place = match (model.placement.as_deref(), model.device) {
        (Some("cpu"), _) => "cpu".to_string(),
        (_, Some(device)) if model.state != "unloaded" => format!("GPU {device}"),
        _ => "-".to_string(),
    };
    let mib = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let priority = if model.pinned { format!("{} pin", model.priority) } else { model.priority.to_string() };
    let idle = model.expires_at.map_or("-".to_string(), |at| age(now, at));
    let note = model
        .last_error
        .as_deref()
        .or(model.note.as_deref())
        .map(|n| n.lines().next().unwrap_or_default().to_string())
        .or_else(|| model.state_reason.clone())
        .unwrap_or_default();
    Row::new([
        Cell::from(SWATCH.to_string()).style(Style::new().fg(PALETTE[row % PALETTE.len()])),
        Cell::from(model.id.clone()),
        Cell::from(model.state.clone()).style(state_style),
        Cell::from(place),
        Cell::from(model.vram_mib.to_string()),
        Cell::from(mib(model.declared_mib)),
        Cell::from(mib(model.measured_mib)),
        Cell::from(model.in_use.to_string()),
        Cell::from(priority),
        Cell::from(idle),
        Cell::from(note).style(if model.last_error.is_some() { Style::new().fg(Color::Red) } else { Style::new() }),
    ])
}

fn draw_leases(frame: &mut Frame, state: &TopState, area: Rect) {
    let leases = state.status.as_ref().map_or(&[][..], |s| s.leases.as_slice());
    let rows = leases.iter().map(|lease| {
        let what = lease.model.as_deref().map(|m| format!("model {m}")).unwrap_or_default();
        let exclusive = if lease.exclusive { "excl" } else { "" };
        Row::new([
            lease.holder.clone(),
            format!("GPU {}", lease.device),
            format!("{} MiB", lease.vram_mib),
            exclusive.to_string(),
            what,
        ])
    });
    let widths =
        [Constraint::Min(8), Constraint::Length(5), Constraint::Length(10), Constraint::Length(4), Constraint::Fill(1)];
    let title = format!(" Leases ({}) ", leases.len());
    frame.render_widget(Table::new(rows, widths).block(Block::bordered().title(title)), area);
}

fn draw_queue(frame: &mut Frame, state: &TopState, area: Rect) {
    let queue = state.status.as_ref().map_or(&[][..], |s| s.queue.as_slice());
    let rows = queue.iter().map(|entry| {
        Row::new([
            entry.requester.clone(),
            entry.kind.clone(),
            format!("{} MiB", entry.vram_mib),
            age(entry.since, state.now),
            entry.reason.clone().unwrap_or_else(|| "not looked at yet".to_string()),
        ])
    });
    let widths =
        [Constraint::Min(8), Constraint::Length(5), Constraint::Length(10), Constraint::Length(5), Constraint::Fill(3)];
    let title = format!(" Queue ({}) ", queue.len());
    frame.render_widget(Table::new(rows, widths).block(Block::bordered().title(title)), area);
}

fn draw_events(frame: &mut Frame, state: &TopState, area: Rect) {
    let block = Block::bordered().title(" Events ");
    let shown = usize::from(block.inner(area).height);
    let skip = state.events.len().saturating_sub(shown);
    let lines: Vec<Line> =
        state.events.iter().skip(skip).map(|e| Line::raw(super::super::events::describe(e))).collect();
    frame.render_widget(Paragraph::new(lines).block(block), area);
}

fn footer_line(state: &TopState) -> Line<'static> {
    let mut spans = vec![Span::styled(KEYS, Style::new().fg(Color::DarkGray))];
    if let Some(notice) = &state.notice {
        let style = if notice.failed { Style::new().fg(Color::Red) } else { Style::new().fg(Color::Cyan) };
        spans.push(Span::styled(format!("  {}", notice.text), style));
    }
    Line::from(spans)
}

fn draw_picker(frame: &mut Frame, state: &TopState) {
    let current = state.status.as_ref().and_then(|s| s.mode.as_deref());
    let height = u16::try_from(state.modes.len()).unwrap_or(u16::MAX).saturating_add(3);
    let width = state.modes.iter().map(|m| m.chars().count()).max().unwrap_or(0).saturating_add(16);
    let area = frame.area();
    let width = u16::try_from(width).unwrap_or(u16::MAX).clamp(40, area.width.max(1));
    let height = height.min(area.height.max(1));
    let popup = Rect { x: area.x + (area.width - width) / 2, y: area.y + (area.height - height) / 2, width, height };
    let rows = state.modes.iter().map(|mode| {
        let mark = if Some(mode.as_str()) == current { " (current)" } else { "" };
        Row::new([format!("{mode}{mark}")])
    });
    let table = Table::new(rows, [Constraint::Fill(1)])
        .block(Block::bordered().title(" Mode: Enter applies, Esc closes "))
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .highlight_symbol("▶ ");
    let mut selection = TableState::default().with_selected(state.picker);
    frame.render_widget(Clear, popup);
    frame.render_stateful_widget(table, popup, &mut selection);
}

/// How long from `from` to `to`, as a person reads it (`45s`, `3m`, `2h`); `0s` when `to` is
/// earlier.
fn age(from: DateTime<Utc>, to: DateTime<Utc>) -> String {
    let seconds = (to - from).num_seconds().max(0);
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m", seconds / 60),
        _ => format!("{}h", seconds / 3600),
    }
}
