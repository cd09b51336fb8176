//! Config errors and where they are: key paths, line lookup in the text, typo suggestions.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;

/// A configuration error, placed as precisely as the file allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, when the config came from one.
    pub file: Option<PathBuf>,
    /// The dotted key, e.g. `gpu.warning_pct` or `gpu.sim.devices[1].total_mib`.
    pub key: Option<String>,
    /// 1-based line.
    pub line: Option<usize>,
    /// 1-based column.
    pub column: Option<usize>,
    /// What is wrong and, where possible, what would be right.
    pub message: String,
    /// The text of the offending line, for context.
    pub source_line: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "config".into());
        write!(f, "{file}")?;
        if let Some(line) = self.line {
            write!(f, ", line {line}")?;
            if let Some(column) = self.column {
                write!(f, ", column {column}")?;
            }
        }
        if let Some(key) = &self.key {
            write!(f, ", key `{key}`")?;
        }
        write!(f, ": {}", self.message)?;
        if let (Some(line), Some(text)) = (self.line, &self.source_line) {
            write!(f, "\n{line:>5} | {text}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// An error at `span` of `text` (line, column and the line's text), if the span is known.
    pub(super) fn at(
        text: &str,
        file: Option<PathBuf>,
        span: Option<Range<usize>>,
        key: Option<String>,
        message: String,
    ) -> Box<Self> {
        let (line, column, source_line) = match span {
            Some(span) => {
                let (line, column) = line_and_column(text, span.start);
                (Some(line), Some(column), text.lines().nth(line - 1).map(str::to_string))
            }
            None => (None, None, None),
        };
        // Whatever went wrong near the token, the error must not carry it to a log: not its line,
        // and not serde's quote of its value.
        let near_token = |text: &str| text.to_ascii_lowercase().contains("token");
        let source_line = source_line.filter(|line| !near_token(line));
        let message = if key.as_deref().is_some_and(near_token) {
            "must be a string of visible ASCII characters (the value is not shown)".to_string()
        } else {
            message
        };
        Box::new(ConfigError { file, key, line, column, message, source_line })
    }
}

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

pub(super) fn render_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Builds a key path from literal parts: `path(&["gpu", "warning_pct"])`.
pub(super) fn key_path(parts: &[&str]) -> Vec<Seg> {
    parts.iter().map(|p| Seg::Key((*p).to_string())).collect()
}

/// Serde's "unknown field `vrma`, expected one of `backend`, ..." (or "unknown variant") with
/// "did you mean `vram`?" added when one expected name is close to the one written.
pub(super) fn with_suggestion(message: &str) -> String {
    let unknown = ["unknown field `", "unknown variant `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split('`').next());
    let Some(unknown) = unknown else { return message.to_string() };
    let Some((head, expected)) = message.split_once(", expected ") else { return message.to_string() };
    // The names are the backticked words of the "expected" part: `a`, `b` or `c`.
    let candidates = expected.split('`').skip(1).step_by(2);
    match closest(unknown, candidates) {
        Some(best) => format!("{head}, did you mean `{best}`? (expected {expected})"),
        None => message.to_string(),
    }
}

/// The candidate nearest to `written` by edit distance (a swap of two neighbours counts as one
/// edit, case is ignored: `VRAM` suggests `vram`), if it is near enough to be the intended one:
/// one edit for names up to four letters, two up to eight, three beyond.
fn closest<'a>(written: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let written = written.to_lowercase();
    let limit = match written.chars().count() {
        0..=4 => 1,
        5..=8 => 2,
        _ => 3,
    };
    candidates
        .map(|candidate| (strsim::osa_distance(&written, candidate), candidate))
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// 1-based line and column of a byte offset.
pub(super) fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map(|nl| before.len() - nl).unwrap_or(before.len() + 1);
    (line, column)
}

/// Where a key path sits in the text: the key itself, or, for a key that is absent (its default
/// conflicts with another key), the nearest enclosing table that is present.
pub(super) fn locate(text: &str, path: &[Seg]) -> Option<Range<usize>> {
    let document = toml_edit::Document::parse(text.to_string()).ok()?;
    let mut item = document.as_item();
    // Inside an inline array or table, navigation continues over values rather than items.
    let mut value: Option<&toml_edit::Value> = None;
    let mut found: Option<Range<usize>> = None;
    for (position, seg) in path.iter().enumerate() {
        match seg {
            Seg::Key(key) => {
                let table: Option<&dyn toml_edit::TableLike> = match value {
                    Some(v) => v.as_inline_table().map(|t| t as &dyn toml_edit::TableLike),
                    None => item.as_table_like(),
                };
                let Some((k, next)) = table.and_then(|t| t.get_key_value(key)) else { return found };
                found = k.span().or_else(|| next.span()).or(found);
                item = next;
                value = next.as_value();
            }
            Seg::Index(index) => {
                if value.is_none()
                    && let Some(tables) = item.as_array_of_tables()
                {
                    let Some(table) = tables.get(*index) else { return found };
                    found = table.span().or(found);
                    return locate_in_table(table, &path[position + 1..], found);
                }
                let Some(element) = value.and_then(|v| v.as_array()).and_then(|a| a.get(*index)) else {
                    return found;
                };
                found = element.span().or(found);
                value = Some(element);
            }
        }
    }
    found
}

/// `locate` continued inside one table of an array of tables (`[[gpu.sim.devices]]`).
fn locate_in_table(table: &toml_edit::Table, rest: &[Seg], found: Option<Range<usize>>) -> Option<Range<usize>> {
    match rest.first() {
        Some(Seg::Key(key)) => match table.get_key_value(key) {
            Some((k, item)) => k.span().or_else(|| item.span()).or(found),
            None => found,
        },
        _ => found,
    }
}
