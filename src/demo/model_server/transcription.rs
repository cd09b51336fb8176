//! The demo model server's reading of a transcription request's multipart form.

use std::convert::Infallible;

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::http::header::CONTENT_TYPE;

/// What a transcription request sent: the size of its `file` and the `response_format` it asked for.
pub(super) struct TranscriptionForm {
    pub(super) file_bytes: Option<usize>,
    pub(super) response_format: Option<String>,
}

/// Reads a transcription request's multipart form (the body is already in memory: the daemon
/// buffers it too, to find the `model` field).
pub(super) async fn read_transcription_form(headers: &HeaderMap, body: Bytes) -> Result<TranscriptionForm, String> {
    let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !content_type.starts_with("multipart/form-data") {
        return Err(format!(
            "a transcription must be sent as multipart/form-data (curl -F file=@audio.wav -F model=NAME), not {:?}",
            content_type
        ));
    }
    let boundary = multer::parse_boundary(content_type).map_err(|e| format!("malformed multipart body: {e}"))?;
    let mut form =
        multer::Multipart::new(futures_util::stream::once(async move { Ok::<Bytes, Infallible>(body) }), boundary);
    let mut read = TranscriptionForm { file_bytes: None, response_format: None };
    while let Some(field) = form.next_field().await.map_err(|e| format!("malformed multipart body: {e}"))? {
        match field.name() {
            Some("file") => {
                let data = field.bytes().await.map_err(|e| format!("unreadable `file` field: {e}"))?;
                read.file_bytes = Some(data.len());
            }
            Some("response_format") => {
                let text = field.text().await.map_err(|e| format!("unreadable `response_format` field: {e}"))?;
                read.response_format = Some(text.trim().to_owned());
            }
            _ => {}
        }
    }
    Ok(read)
}
