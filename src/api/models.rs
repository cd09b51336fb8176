//! Model endpoints: list, load, unload, logs.

use std::convert::Infallible;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_stream::wrappers::BroadcastStream;

use super::error::{PathParam, QueryParams};
use super::{ApiError, AppState};
use crate::status::ModelStatus;

pub(super) async fn list(State(state): State<AppState>) -> Json<Vec<ModelStatus>> {
    Json(state.arbiter.view().models.clone())
}

/// Blocks until the model is ready (or the request fails), like `vramgate load`.
pub(super) async fn load(
    State(state): State<AppState>,
    PathParam(name): PathParam,
) -> Result<Json<ModelStatus>, ApiError> {
    Ok(Json(state.arbiter.load(&name, true).await?))
}

/// The answer to an unload: the model's status entry, plus whether there was anything to unload.
#[derive(Debug, Serialize)]
pub(super) struct UnloadAnswer {
    #[serde(flatten)]
    status: ModelStatus,
    /// False when the model was unloaded (or failed) already.
    was_loaded: bool,
}

/// Blocks until the model is unloaded and its memory is back.
pub(super) async fn unload(
    State(state): State<AppState>,
    PathParam(name): PathParam,
) -> Result<Json<UnloadAnswer>, ApiError> {
    let unloaded = state.arbiter.unload(&name).await?;
    Ok(Json(UnloadAnswer { status: unloaded.status, was_loaded: unloaded.was_loaded }))
}

#[derive(Debug, Deserialize)]
pub(super) struct LogQuery {
    /// Lines from the end to start with.
    #[serde(default = "default_tail")]
    tail: usize,
    /// Keep streaming new lines.
    #[serde(default)]
    follow: bool,
}

fn default_tail() -> usize {
    200
}

/// The model's recent output as text; with `follow=true`, new lines as they come, until the
/// client goes away or the daemon stops.
pub(super) async fn logs(
    State(state): State<AppState>,
    PathParam(name): PathParam,
    QueryParams(query): QueryParams<LogQuery>,
) -> Result<Response, ApiError> {
    let buffer = state.arbiter.logs(&name).await?;
    let Some(buffer) = buffer else {
        if query.follow {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("model {name} has not run since the daemon started: nothing to follow yet"),
            ));
        }
        return Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], String::new()).into_response());
    };
    if !query.follow {
        let mut text = buffer.tail(query.tail).join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        return Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response());
    }
    // The tail and the subscription in one step, so no line falls between the two.
    let (tail, feed) = buffer.tail_and_follow(query.tail);
    let mut text = tail.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    let feed = BroadcastStream::new(feed);
    let head = futures_util::stream::once(async move { Ok::<Bytes, Infallible>(Bytes::from(text)) });
    let rest = feed.filter_map(|line| async move { line.ok().map(|l| Ok::<Bytes, Infallible>(Bytes::from(l + "\n"))) });
    let body = Body::from_stream(head.chain(rest).take_until(state.shutdown.clone().cancelled_owned()));
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response())
}
