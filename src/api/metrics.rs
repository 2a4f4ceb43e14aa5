//! `GET /metrics` in the Prometheus text format (version 0.0.4).
//!
//! The figures are gathered on request from every shard (their counters
//! live on the shards' own threads, unshared) and from the webhook
//! outbox's atomics, so a registry library would only add a copy; the text
//! format is written here directly.

use super::{shard_timeout, ApiError, Shared};
use crate::shard::budget::{Stage, StageLatency, STAGE_BUCKETS_US};
use crate::shard::state::COMMIT_BUCKETS_US;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::fmt::Write;
use std::sync::atomic::Ordering;

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {value}");
}

pub async fn metrics(State(api): State<Shared>) -> Result<Response, ApiError> {
    let stats = tokio::time::timeout(shard_timeout(&api), api.control.stats())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                "a shard did not answer",
            )
        })?
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the server is shutting down",
            )
        })?;
    let mut out = String::with_capacity(4096);
    metric(
        &mut out,
        "ruyi_shards",
        "gauge",
        "Shards (one pinned executor each).",
        api.control.shards(),
    );
    metric(
        &mut out,
        "ruyi_connections",
        "gauge",
        "Open client connections.",
        stats.connections,
    );
    metric(
        &mut out,
        "ruyi_connections_accepted_total",
        "counter",
        "Client connections accepted.",
        stats.connections_accepted,
    );
    metric(
        &mut out,
        "ruyi_connections_refused_total",
        "counter",
        "Client connections refused (shard full or shutting down).",
        stats.connections_refused,
    );
    metric(
        &mut out,
        "ruyi_connections_rate_limited_total",
        "counter",
        "Client connections refused by limits.accepts_per_ip_per_second.",
        stats.connections_rate_limited,
    );
    metric(
        &mut out,
        "ruyi_messages_received_total",
        "counter",
        "Sends sequenced by channel owners (clients and API), accepted or refused.",
        stats.sends_received,
    );
    metric(
        &mut out,
        "ruyi_messages_committed_total",
        "counter",
        "Messages durably stored.",
        stats.messages_committed,
    );
    metric(
        &mut out,
        "ruyi_messages_delivered_total",
        "counter",
        "Messages pushed to connections: live, from a backlog or on resume (retries are ruyi_retries_total).",
        stats.recvs_written,
    );
    metric(
        &mut out,
        "ruyi_acks_received_total",
        "counter",
        "RecvAck frames received from clients.",
        stats.acks_received,
    );
    metric(
        &mut out,
        "ruyi_retries_total",
        "counter",
        "Pushes retried because no ack came in time.",
        stats.redeliveries,
    );
    metric(
        &mut out,
        "ruyi_inbox_depth",
        "gauge",
        "Messages queued for other shards' inboxes, not yet handed over.",
        stats.inbox_depth,
    );
    metric(
        &mut out,
        "ruyi_outbound_queued_bytes",
        "gauge",
        "Bytes queued for connections and not yet written to their sockets (each bounded by limits.outbound_buffer_max_bytes).",
        stats.outbound_queued_bytes,
    );
    metric(
        &mut out,
        "ruyi_slow_consumers_total",
        "counter",
        "Connections cut off for not reading what was queued for them.",
        stats.slow_consumers,
    );
    metric(
        &mut out,
        "ruyi_channels_cached",
        "gauge",
        "Channels held in memory by their owner shards (limits.channels_cached_per_shard_max each).",
        stats.channels_cached,
    );
    metric(
        &mut out,
        "ruyi_channels_evicted_total",
        "counter",
        "Idle channels dropped from memory (read again from storage when next used).",
        stats.channels_evicted,
    );
    metric(
        &mut out,
        "ruyi_commit_batches_total",
        "counter",
        "Storage group commits.",
        stats.commit_batches,
    );
    let latency = &stats.commit_latency;
    let name = "ruyi_storage_commit_seconds";
    let _ = writeln!(out, "# HELP {name} Time to make one commit batch durable (the WAL sync with storage.sync = \"always\").");
    let _ = writeln!(out, "# TYPE {name} histogram");
    let mut cumulative = 0;
    for (bound, count) in COMMIT_BUCKETS_US.iter().zip(latency.counts) {
        cumulative += count;
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{}\"}} {cumulative}",
            *bound as f64 / 1e6
        );
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", latency.count);
    let _ = writeln!(out, "{name}_sum {}", latency.sum_us as f64 / 1e6);
    let _ = writeln!(out, "{name}_count {}", latency.count);
    stage_histograms(&mut out, &stats.budget);
    let hooks = api.control.webhooks();
    metric(
        &mut out,
        "ruyi_webhook_outbox_events",
        "gauge",
        "Webhook events waiting in the durable outbox.",
        hooks.outbox_events.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "ruyi_webhook_outbox_bytes",
        "gauge",
        "Bytes of the webhook outbox (bounded by webhook.outbox_max_bytes).",
        hooks.outbox_bytes.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "ruyi_webhook_delivered_total",
        "counter",
        "Webhook events delivered (answered 2xx).",
        hooks.delivered.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "ruyi_webhook_failed_attempts_total",
        "counter",
        "Webhook attempts that failed and will be retried.",
        hooks.failed_attempts.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "ruyi_webhook_events_dropped_total",
        "counter",
        "Webhook events dropped because the outbox was full.",
        hooks.dropped.load(Ordering::Relaxed),
    );
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response())
}

/// The latency budget: one histogram per stage of a message's path (see
/// `shard::budget`), labelled `stage`.
fn stage_histograms(out: &mut String, budget: &StageLatency) {
    let name = "ruyi_message_stage_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time each stage of a message's path took (route, queue, write, ack_return, fanout; send_ack and delivered from the frame read; flush per socket write; recv_ack from a push to its acknowledgement)."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    for stage in Stage::ALL {
        let i = stage as usize;
        let label = stage.name();
        let mut cumulative = 0;
        for (bound, count) in STAGE_BUCKETS_US.iter().zip(budget.counts[i]) {
            cumulative += count;
            let _ = writeln!(
                out,
                "{name}_bucket{{stage=\"{label}\",le=\"{}\"}} {cumulative}",
                *bound as f64 / 1e6
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{stage=\"{label}\",le=\"+Inf\"}} {}",
            budget.count[i]
        );
        let _ = writeln!(
            out,
            "{name}_sum{{stage=\"{label}\"}} {}",
            budget.sum_us[i] as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{stage=\"{label}\"}} {}", budget.count[i]);
    }
}
