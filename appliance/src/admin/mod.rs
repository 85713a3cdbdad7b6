//! The admin HTTP endpoint (`ft.admin`, loopback by default): `/status`
//! (JSON, see [`crate::ft::status::StatusReport`]) and `/metrics`
//! (Prometheus text format). [`get`] is the small client `ftvm status`
//! uses.

use crate::ft::status::{StatusReport, StatusSources};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get as route_get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// What an operator can ask a running node to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminCommand {
    /// Go live now, without the witness (`ftvm go-live --force`).
    ForceGoLive,
    /// Hand the live role to the protected backup (`ftvm switchover`).
    Switchover,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin endpoint {addr} (key `ft.admin`): cannot listen: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin endpoint {addr}: {message}")]
    Request { addr: SocketAddr, message: String },
}

/// Binds the endpoint now (so a taken port is reported at start), then
/// serves it in the background.
pub async fn start(
    addr: SocketAddr,
    sources: Arc<StatusSources>,
) -> Result<SocketAddr, AdminError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    let app = Router::new()
        .route("/status", route_get(status))
        .route("/metrics", route_get(metrics))
        .route("/go-live", axum::routing::post(force_go_live))
        .route("/switchover", axum::routing::post(switchover))
        .with_state(sources.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(%local, error = %e, "admin endpoint stopped");
        }
    });
    tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(1));
        loop {
            t.tick().await;
            sources.sample();
        }
    });
    tracing::info!(%local, "admin endpoint listening (/status, /metrics)");
    Ok(local)
}

async fn status(State(s): State<Arc<StatusSources>>) -> impl IntoResponse {
    axum::Json(s.report())
}

/// `POST /go-live?force=yes`: only with the explicit query, so nothing
/// reaches it by accident.
async fn force_go_live(
    State(s): State<Arc<StatusSources>>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> impl IntoResponse {
    if q.as_deref() != Some("force=yes") {
        return (
            StatusCode::BAD_REQUEST,
            "go-live without the witness needs ?force=yes\n".to_string(),
        );
    }
    command_answer(tokio::task::spawn_blocking(move || s.command(AdminCommand::ForceGoLive)).await)
}

/// `POST /switchover`: a planned hand-over to the backup. Answers once the
/// backup is live (or with why it did not happen).
async fn switchover(State(s): State<Arc<StatusSources>>) -> impl IntoResponse {
    command_answer(tokio::task::spawn_blocking(move || s.command(AdminCommand::Switchover)).await)
}

fn command_answer(
    answer: Result<Result<String, String>, tokio::task::JoinError>,
) -> (StatusCode, String) {
    match answer {
        Ok(Ok(text)) => (StatusCode::OK, format!("{text}\n")),
        Ok(Err(text)) => (StatusCode::CONFLICT, format!("{text}\n")),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

async fn metrics(State(s): State<Arc<StatusSources>>) -> impl IntoResponse {
    match render_metrics(&s.report()) {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabel {
    role: String,
}

fn gauge(r: &mut Registry, name: &str, help: &str, v: f64) {
    let g = Gauge::<f64, AtomicU64>::default();
    g.set(v);
    r.register(name, help, g);
}

fn counter(r: &mut Registry, name: &str, help: &str, v: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(v);
    r.register(name, help, c);
}

/// The Prometheus text of a status report.
pub fn render_metrics(s: &StatusReport) -> Result<String, std::fmt::Error> {
    let mut r = Registry::with_prefix("ftvm");
    let role = Family::<RoleLabel, Gauge>::default();
    role.get_or_create(&RoleLabel {
        role: s.role.to_string(),
    })
    .set(1);
    r.register("role", "The node's role (label), always 1", role);
    gauge(
        &mut r,
        "epoch",
        "The pair's epoch as this node knows it",
        s.epoch as f64,
    );
    gauge(
        &mut r,
        "protected",
        "1 when live and a backup has every entry outputs depend on",
        f64::from(u8::from(s.protected)),
    );
    gauge(
        &mut r,
        "peer_connected",
        "1 while the log channel to the peer is up",
        f64::from(u8::from(s.peer.connected)),
    );
    gauge(
        &mut r,
        "peer_rtt_seconds",
        "Round-trip time to the peer",
        s.peer.rtt_ms / 1e3,
    );
    counter(
        &mut r,
        "peer_sessions",
        "Log channel sessions so far",
        s.peer.sessions,
    );
    if let Some(l) = &s.log {
        counter(&mut r, "log_entries", "Log entries written", l.entries);
        counter(
            &mut r,
            "log_bytes",
            "Log bytes written (entries, unframed)",
            l.bytes,
        );
        gauge(
            &mut r,
            "log_last_index",
            "Index of the last log entry",
            l.last_index as f64,
        );
        gauge(
            &mut r,
            "log_acked_index",
            "Index of the last entry the backup acked",
            l.last_acked as f64,
        );
        gauge(
            &mut r,
            "log_buffer_bytes",
            "Unacked log bytes held",
            l.buffer_bytes as f64,
        );
        counter(
            &mut r,
            "vcpu_slowed_ms",
            "Time the vCPU was slowed for a lagging backup",
            l.slowed_ms,
        );
        counter(
            &mut r,
            "vcpu_waited_full_ms",
            "Time the vCPU waited for room in the log buffer",
            l.waited_full_ms,
        );
    }
    if let Some(p) = &s.replay {
        gauge(
            &mut r,
            "replay_lag_seconds",
            "Guest time the backup's replay is behind",
            p.lag_ms / 1e3,
        );
        gauge(
            &mut r,
            "replay_exit_ordinal",
            "Exit ordinal replayed",
            p.exit_ordinal as f64,
        );
    }
    if let Some(h) = &s.held_outputs {
        gauge(
            &mut r,
            "held_outputs",
            "Guest frames held by the output rule",
            h.frames as f64,
        );
        counter(&mut r, "outputs_sent", "Guest frames let out", h.sent);
        counter(
            &mut r,
            "outputs_dropped",
            "Guest frames dropped (gate full or fenced)",
            h.dropped,
        );
        gauge(
            &mut r,
            "output_hold_mean_seconds",
            "Mean time a guest frame waited for the backup's ack",
            h.mean_hold_ms / 1e3,
        );
    }
    gauge(
        &mut r,
        "divergence",
        "1 once replay diverged",
        f64::from(u8::from(s.divergence.is_some())),
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r)?;
    Ok(out)
}

/// GETs `path` from an admin endpoint; returns the body of a 200 answer.
pub fn get(addr: SocketAddr, path: &str) -> Result<String, AdminError> {
    request(addr, "GET", path)
}

/// Sends `method path` to an admin endpoint; returns the body of a 200 answer.
pub fn request(addr: SocketAddr, method: &str, path: &str) -> Result<String, AdminError> {
    let err = |message: String| AdminError::Request { addr, message };
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| err(format!("cannot connect (is the node running?): {e}")))?;
    // A switchover answers once the backup is live: seconds over a WAN.
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| err(e.to_string()))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"
    )
    .map_err(|e| err(e.to_string()))?;
    let mut raw = Vec::new();
    s.take(16 << 20)
        .read_to_end(&mut raw)
        .map_err(|e| err(e.to_string()))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| err("malformed HTTP answer".into()))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        return Err(err(format!("answered {status:?}: {}", body.trim())));
    }
    Ok(body.to_string())
}
