//! `POST /vramgate/plan`: whether a set of models fits together (see `crate::plan`), from what is
//! known now or, with `"measure": true`, measured for real and then put back.

use std::collections::HashMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::error::{JsonBody, JsonRequest};
use super::{ApiError, AppState};
use crate::plan::report::PlanReport;
use crate::plan::{self, measure};

/// The body: `{"models": ["llm", "stt"], "mode": "recording", "measure": false, "margin_pct": 5}`,
/// every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PlanRequest {
    /// The set (ids or aliases); empty: the mode's models, else every configured model.
    #[serde(default)]
    models: Vec<String>,
    /// A `[modes.NAME]` whose GPU models are the set.
    #[serde(default)]
    mode: Option<String>,
    /// Load, stress and unload the set for real.
    #[serde(default)]
    measure: bool,
    /// Below this share of usable memory left free, the verdict is MARGINAL.
    #[serde(default)]
    margin_pct: Option<f64>,
}

impl JsonRequest for PlanRequest {
    const WHAT: &'static str = "plan request";
    const EXAMPLE: Option<&'static str> = Some(r#"{"models": ["llm", "stt"], "measure": false}"#);
    fn when_empty() -> Option<Self> {
        Some(PlanRequest::default())
    }
}

/// Judges the set and answers the report; the verdict is in the body (`verdict`, `exit_code`),
/// so a NO-GO is still a 200.
pub(super) async fn plan(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<PlanRequest>,
) -> Result<Json<PlanReport>, ApiError> {
    let margin = request.margin_pct.unwrap_or(plan::DEFAULT_MARGIN_PCT);
    if !(0.0..=50.0).contains(&margin) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("margin_pct is {margin}; give a percentage from 0 to 50"),
        ));
    }
    let set = if !request.models.is_empty() {
        request.models
    } else if let Some(mode) = &request.mode {
        let Some(config) = state.arbiter.modes().get(mode) else {
            let known: Vec<&str> = state.arbiter.modes().keys().map(String::as_str).collect();
            let list = if known.is_empty() { "none defined".to_string() } else { known.join(", ") };
            return Err(ApiError::new(StatusCode::NOT_FOUND, format!("unknown mode {mode:?} (modes: {list})")));
        };
        config.gpu_models()
    } else {
        state.arbiter.view().models.iter().map(|m| m.id.clone()).collect()
    };
    if set.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "no models to plan for: none are configured"));
    }
    let mut inputs = state.arbiter.plan_inputs(&set).await?;
    let estimates: HashMap<_, _> = state.catalog.estimate_terms();
    let measurement = if request.measure {
        // One multi-step change at a time: not beside a mode switch or another measurement.
        let Some(exclusive) = state.arbiter.try_exclusive() else {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "a mode switch or another plan measurement is running; try again when it ends",
            ));
        };
        let rig = measure::Rig {
            arbiter: state.arbiter.clone(),
            gpu: state.gpu.clone(),
            warmups: state.catalog.warmups(),
            sampler: state.sampler.clone(),
        };
        let cancel = CancellationToken::new();
        // A client that goes away (Ctrl-C) cancels the measurement; the task still restores
        // what it changed before it ends.
        let _cancel_when_dropped = cancel.clone().drop_guard();
        let task = tokio::spawn(async move {
            let _exclusive = exclusive;
            let measurement = measure::measure(&rig, &mut inputs, &cancel).await;
            (measurement, inputs)
        });
        let (measurement, measured_inputs) = task
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("the measurement failed: {e}")))?;
        inputs = measured_inputs;
        Some(measurement)
    } else {
        None
    };
    let ids = inputs.models.iter().map(|m| m.id.clone()).collect();
    let judgement = plan::judge(&inputs, &estimates, margin);
    Ok(Json(PlanReport::new(ids, judgement, measurement)))
}
