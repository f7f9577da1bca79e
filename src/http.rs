//! `/metrics` (Prometheus text), `/healthz` (the process is alive) and `/readyz`
//! (Postgres and Kafka reachable and the schema usable) on `http.listen`.
//!
//! `/readyz` is the relay's own readiness, for monitoring and for a relay
//! deployed on its own. It must never be a probe of a container in the
//! application's pod: it fails while Kafka is away, and a pod is ready only
//! when all its containers are, so it would take the application out of
//! service for Kafka's sake (docs/deployment.md).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::telemetry::events::Readiness;
use crate::telemetry::Emit;

/// Readiness latch: each dependency's last known state, set by the monitor.
#[derive(Debug, Default)]
pub struct Health {
    postgres: AtomicBool,
    kafka: AtomicBool,
    schema: AtomicBool,
    problems: Mutex<Vec<String>>,
}

impl Health {
    /// Records one round of checks; `problems` explains every `false`.
    pub fn update(&self, postgres: bool, schema: bool, kafka: bool, problems: Vec<String>) {
        let was_ready = self.is_ready();
        self.postgres.store(postgres, Ordering::Relaxed);
        self.schema.store(schema, Ordering::Relaxed);
        self.kafka.store(kafka, Ordering::Relaxed);
        Readiness { ready: self.is_ready(), was_ready, problems: &problems }.emit();
        if let Ok(mut p) = self.problems.lock() {
            *p = problems;
        }
    }

    pub fn is_ready(&self) -> bool {
        self.postgres.load(Ordering::Relaxed)
            && self.schema.load(Ordering::Relaxed)
            && self.kafka.load(Ordering::Relaxed)
    }

    fn problems(&self) -> Vec<String> {
        self.problems.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

/// The health of each outbox the process serves, by table.
pub type Healths = Vec<(String, Arc<Health>)>;

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    health: Arc<Healths>,
}

/// Serves until `shutdown` flips.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    health: Healths,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let health = Arc::new(health);
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
}

async fn render_metrics(State(s): State<AppState>) -> impl IntoResponse {
    s.metrics.run_upkeep();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render())
}

/// Ready when every outbox is; otherwise each problem, named by its outbox
/// when the process serves several.
async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.iter().all(|(_, h)| h.is_ready()) {
        return (StatusCode::OK, "ready\n".to_string());
    }
    let mut body = String::from("not ready\n");
    for (table, h) in s.health.iter().filter(|(_, h)| !h.is_ready()) {
        for p in h.problems() {
            if s.health.len() > 1 {
                body.push_str(&format!("{table}: "));
            }
            body.push_str(&p);
            body.push('\n');
        }
    }
    (StatusCode::SERVICE_UNAVAILABLE, body)
}
