//! Requests through the proxy, counted on its hot path with atomics only: no lock, no map that
//! grows. Every model's series are made once, at start-up, from the configured models (the only
//! values the `model` label can take, so a client naming models at random cannot grow the
//! daemon); a request for no known model counts under `model=""`.
//!
//! prometheus-client's `Family` takes a read lock per lookup and its `Histogram` a mutex per
//! observation; [`AtomicHistogram`] and the fixed per-model table here avoid both, and a
//! [`Collector`] encodes them at scrape time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;

/// Time waiting for admission: from nothing (a ready model) to a swap or a queue of minutes.
pub const ADMISSION_BUCKETS: &[f64] = &[0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
/// Time to first byte: a warm model's first token, up to a cold start behind a queue.
pub const FIRST_BYTE_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// A histogram of durations with fixed buckets, observed with two atomic additions.
#[derive(Debug)]
pub struct AtomicHistogram {
    /// Upper bounds in seconds, ascending.
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last one is over every bound (`+Inf`).
    counts: Box<[AtomicU64]>,
    /// The sum of the observations, in microseconds (2^64 µs is half a million years).
    sum_micros: AtomicU64,
}

impl AtomicHistogram {
    /// An empty histogram with these bounds (seconds, ascending).
    pub fn new(bounds: &'static [f64]) -> AtomicHistogram {
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        AtomicHistogram { bounds, counts, sum_micros: AtomicU64::new(0) }
    }

    /// Counts one duration.
    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = self.bounds.iter().position(|bound| seconds <= *bound).unwrap_or(self.bounds.len());
        if let Some(count) = self.counts.get(bucket) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros.fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// How many durations were counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        // The count is the buckets' own total, so `_count` always equals the `+Inf` bucket even
        // while requests are counted during the scrape.
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The surface a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// `/v1/...`.
    OpenAi,
    /// `/api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings`.
    Ollama,
}

impl Surface {
    const ALL: [Surface; 2] = [Surface::OpenAi, Surface::Ollama];

    /// The `surface` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Surface::OpenAi => "openai",
            Surface::Ollama => "ollama",
        }
    }
}

/// The `status_class` label values, by index: the status code's hundreds (1xx…5xx), and
/// `closed` for a request whose client went away before any answer.
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "closed"];
/// The index of `closed` in [`CLASSES`].
const CLOSED: usize = 5;

/// The index in [`CLASSES`] of a status code.
fn class_of(status: StatusCode) -> usize {
    // Status codes are 100..=999; anything above 5xx counts as 5xx.
    usize::from(status.as_u16() / 100).clamp(1, 5) - 1
}

/// One model's requests on one surface.
#[derive(Debug)]
struct SurfaceSeries {
    /// Requests by [`CLASSES`].
    by_class: [AtomicU64; CLASSES.len()],
    /// From the request's body read to its model admitted (pinned).
    admission: AtomicHistogram,
    /// From the request's arrival to its answer's head going back to the client.
    first_byte: AtomicHistogram,
}

impl SurfaceSeries {
    fn new() -> SurfaceSeries {
        SurfaceSeries {
            by_class: Default::default(),
            admission: AtomicHistogram::new(ADMISSION_BUCKETS),
            first_byte: AtomicHistogram::new(FIRST_BYTE_BUCKETS),
        }
    }
}

/// One model's series, on each surface (indexed as [`Surface::ALL`]).
#[derive(Debug)]
struct ModelSeries {
    surfaces: [SurfaceSeries; 2],
}

impl ModelSeries {
    fn new() -> ModelSeries {
        ModelSeries { surfaces: [SurfaceSeries::new(), SurfaceSeries::new()] }
    }

    fn on(&self, surface: Surface) -> &SurfaceSeries {
        match surface {
            Surface::OpenAi => &self.surfaces[0],
            Surface::Ollama => &self.surfaces[1],
        }
    }
}

/// Every model's request series, fixed at start-up.
#[derive(Debug)]
pub struct RequestMetrics {
    /// By model id, sorted for the exposition.
    models: Vec<(String, ModelSeries)>,
    /// Model id → index in `models`.
    index: HashMap<String, usize>,
    /// The index of the series of requests for no known model (`model=""`).
    none: usize,
}

impl RequestMetrics {
    /// Series for these model ids, and for requests that name no known model (`model=""`).
    pub fn new(models: impl IntoIterator<Item = String>) -> RequestMetrics {
        let mut ids: Vec<String> = models.into_iter().collect();
        ids.push(String::new());
        ids.sort();
        ids.dedup();
        let index: HashMap<String, usize> = ids.iter().enumerate().map(|(i, id)| (id.clone(), i)).collect();
        let none = index.get("").copied().unwrap_or_default();
        RequestMetrics { models: ids.into_iter().map(|id| (id, ModelSeries::new())).collect(), index, none }
    }

    /// Starts recording a request that arrived now on `surface`.
    pub fn start(&self, surface: Surface) -> RequestRecord<'_> {
        RequestRecord { metrics: self, surface, arrived: Instant::now(), model: None, admitted: false, status: None }
    }

    fn series(&self, model: &str) -> Option<&ModelSeries> {
        self.index.get(model).and_then(|&i| self.models.get(i)).map(|(_, series)| series)
    }

    /// The series of requests for no known model.
    fn unknown(&self) -> &ModelSeries {
        &self.models[self.none].1
    }
}

/// One request being recorded; it is counted when dropped (`closed` if no answer was set: the
/// client went away while it waited).
#[derive(Debug)]
pub struct RequestRecord<'a> {
    metrics: &'a RequestMetrics,
    surface: Surface,
    arrived: Instant,
    model: Option<&'a ModelSeries>,
    admitted: bool,
    status: Option<StatusCode>,
}

impl RequestRecord<'_> {
    /// The request is for this model (an id; an unknown one counts under `model=""`).
    pub fn model(&mut self, id: &str) {
        self.model = self.metrics.series(id);
    }

    /// The model was admitted (pinned) after waiting `waited` for it.
    pub fn admitted(&mut self, id: &str, waited: Duration) {
        self.model(id);
        self.admitted = true;
        self.series().on(self.surface).admission.observe(waited);
    }

    /// The answer's head goes back to the client now, with this status.
    pub fn answered(&mut self, status: StatusCode) {
        self.status = Some(status);
        if self.admitted {
            self.series().on(self.surface).first_byte.observe(self.arrived.elapsed());
        }
    }

    fn series(&self) -> &ModelSeries {
        self.model.unwrap_or_else(|| self.metrics.unknown())
    }
}

impl Drop for RequestRecord<'_> {
    fn drop(&mut self) {
        let class = self.status.map_or(CLOSED, class_of);
        self.series().on(self.surface).by_class[class].fetch_add(1, Ordering::Relaxed);
    }
}

/// Which histogram of a model's series on a surface.
type Pick = fn(&SurfaceSeries) -> &AtomicHistogram;

/// Encodes the request series at scrape time; those never used are left out.
#[derive(Debug)]
pub(super) struct RequestCollector(pub std::sync::Arc<RequestMetrics>);

impl Collector for RequestCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let models = &self.0.models;
        let used = |pick: Pick| {
            models.iter().flat_map(move |(id, series)| {
                Surface::ALL
                    .into_iter()
                    .map(move |surface| (id, surface, pick(series.on(surface))))
                    .filter(|(_, _, histogram)| histogram.count() > 0)
            })
        };
        let counts: Vec<_> = models
            .iter()
            .flat_map(|(id, series)| {
                Surface::ALL.into_iter().flat_map(move |surface| {
                    CLASSES.iter().zip(&series.on(surface).by_class).map(move |(class, n)| (id, surface, *class, n))
                })
            })
            .map(|(id, surface, class, n)| (id, surface, class, n.load(Ordering::Relaxed)))
            .filter(|(.., n)| *n > 0)
            .collect();
        if !counts.is_empty() {
            let mut family = encoder.encode_descriptor(
                "vramgate_requests",
                "Requests that named a model, by the model that served (\"\" for none), surface and status class.",
                None,
                MetricType::Counter,
            )?;
            for (id, surface, class, n) in counts {
                let labels = [("model", id.as_str()), ("surface", surface.as_str()), ("status_class", class)];
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        let histograms: [(&str, &str, Pick); 2] = [
            (
                "vramgate_request_admission_wait_seconds",
                "How long a request waited for its model to be admitted (ready and pinned), from when its body was \
                 read: ~0 for a ready model, a load (and any queue or eviction before it) otherwise.",
                |s| &s.admission,
            ),
            (
                "vramgate_request_first_byte_seconds",
                "From a request's arrival to the head of its answer going back (admission included).",
                |s| &s.first_byte,
            ),
        ];
        for (name, help, pick) in histograms {
            let series: Vec<_> = used(pick).collect();
            if series.is_empty() {
                continue;
            }
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (id, surface, histogram) in series {
                let labels = [("model", id.as_str()), ("surface", surface.as_str())];
                histogram.encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_each_duration_in_its_bucket_and_sums_them() {
        let histogram = AtomicHistogram::new(&[0.1, 1.0]);
        histogram.observe(Duration::from_millis(100));
        histogram.observe(Duration::from_millis(500));
        histogram.observe(Duration::from_secs(5));
        let counts: Vec<u64> = histogram.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        assert_eq!(counts, vec![1, 1, 1], "a bound belongs to its bucket (le)");
        assert_eq!(histogram.count(), 3);
        assert_eq!(histogram.sum_micros.load(Ordering::Relaxed), 5_600_000);
    }

    #[test]
    fn status_classes() {
        let class = |code: u16| CLASSES[class_of(StatusCode::from_u16(code).expect("a status code"))];
        assert_eq!((class(200), class(404), class(503), class(101), class(304)), ("2xx", "4xx", "5xx", "1xx", "3xx"));
    }

    #[test]
    fn a_record_counts_once_under_its_model_and_unknown_models_under_none() {
        let metrics = RequestMetrics::new(["llm".to_string()]);
        {
            let mut record = metrics.start(Surface::Ollama);
            record.admitted("llm", Duration::from_millis(3));
            record.answered(StatusCode::OK);
        }
        {
            let mut record = metrics.start(Surface::OpenAi);
            record.model("no-such-model");
            record.answered(StatusCode::NOT_FOUND);
        }
        drop(metrics.start(Surface::OpenAi));
        let llm = metrics.series("llm").expect("llm");
        assert_eq!(llm.on(Surface::Ollama).by_class[1].load(Ordering::Relaxed), 1);
        assert_eq!(llm.on(Surface::Ollama).admission.count(), 1);
        assert_eq!(llm.on(Surface::Ollama).first_byte.count(), 1);
        assert_eq!(llm.on(Surface::OpenAi).by_class.iter().map(|c| c.load(Ordering::Relaxed)).sum::<u64>(), 0);
        let none = metrics.series("").expect("the unknown model");
        assert_eq!(none.on(Surface::OpenAi).by_class[3].load(Ordering::Relaxed), 1, "the 404");
        assert_eq!(none.on(Surface::OpenAi).by_class[CLOSED].load(Ordering::Relaxed), 1, "dropped unanswered");
        assert_eq!(none.on(Surface::OpenAi).first_byte.count(), 0, "never admitted: no time to first byte");
    }
}
