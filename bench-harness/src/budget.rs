//! The gateway's latency budget over a run (`--metrics`): its
//! `ruyi_message_stage_seconds` histograms read from `/metrics` when the
//! measured window opens and after the run, and the difference told per
//! stage (samples, mean, p50, p99; a quantile is interpolated within its
//! bucket, so it is as fine as the buckets: 10, 25, 50, 100, 250, 500 µs,
//! 1, 2.5, 5, 10, 25, 50, 100, 250 ms, 1 s).

use crate::common::http_get;
use std::collections::BTreeMap;

const METRIC: &str = "ruyi_message_stage_seconds";

/// One stage's histogram as scraped: cumulative counts by upper bound (in
/// seconds, `f64::INFINITY` last), and the sum of the samples in seconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Histogram {
    pub(crate) buckets: Vec<(f64, u64)>,
    pub(crate) sum_s: f64,
}

/// Every stage's histogram, by stage name, in the order `/metrics` lists
/// them.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Scrape {
    pub(crate) order: Vec<String>,
    pub(crate) stages: BTreeMap<String, Histogram>,
}

/// One stage over the run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub(crate) struct StageFigures {
    pub(crate) stage: String,
    pub(crate) samples: u64,
    pub(crate) mean_us: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
}

/// Reads the stage histograms from the admin API at `api`
/// (`http://host:port`).
pub(crate) fn scrape(api: &str, token: &str) -> anyhow::Result<Scrape> {
    let (status, body) = http_get(api, token, "/metrics")?;
    if status != 200 {
        anyhow::bail!("{api}/metrics answered {status}: {body}");
    }
    Ok(parse(&body))
}

/// The stage histograms of a Prometheus text exposition.
pub(crate) fn parse(text: &str) -> Scrape {
    let mut scrape = Scrape::default();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(METRIC) else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once(' ') else {
            continue;
        };
        let Some(stage) = label(labels, "stage") else {
            continue;
        };
        if !scrape.stages.contains_key(stage) {
            scrape.order.push(stage.to_owned());
        }
        let histogram = scrape.stages.entry(stage.to_owned()).or_default();
        if labels.starts_with("_bucket") {
            let bound = match label(labels, "le") {
                Some("+Inf") => f64::INFINITY,
                Some(le) => match le.parse() {
                    Ok(le) => le,
                    Err(_) => continue,
                },
                None => continue,
            };
            if let Ok(count) = value.parse() {
                histogram.buckets.push((bound, count));
            }
        } else if labels.starts_with("_sum") {
            histogram.sum_s = value.parse().unwrap_or(0.0);
        }
    }
    scrape
}

/// The value of `name="…"` in a `{…}` label set.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
    let end = start + labels[start..].find('"')?;
    Some(&labels[start..end])
}

/// Each stage between two scrapes.
pub(crate) fn between(before: &Scrape, after: &Scrape) -> Vec<StageFigures> {
    let empty = Histogram::default();
    after
        .order
        .iter()
        .map(|stage| {
            let later = &after.stages[stage];
            let earlier = before.stages.get(stage).unwrap_or(&empty);
            let buckets: Vec<(f64, u64)> = later
                .buckets
                .iter()
                .map(|(bound, count)| {
                    let was = earlier
                        .buckets
                        .iter()
                        .find(|(b, _)| b == bound)
                        .map_or(0, |(_, c)| *c);
                    (*bound, count.saturating_sub(was))
                })
                .collect();
            let samples = buckets.last().map_or(0, |(_, c)| *c);
            let sum_us = (later.sum_s - earlier.sum_s).max(0.0) * 1e6;
            StageFigures {
                stage: stage.clone(),
                samples,
                mean_us: if samples == 0 {
                    0.0
                } else {
                    sum_us / samples as f64
                },
                p50_us: quantile(&buckets, 0.50),
                p99_us: quantile(&buckets, 0.99),
            }
        })
        .collect()
}

/// The `q` quantile of cumulative `buckets` (bounds in seconds), in
/// microseconds, interpolated within its bucket; past the last finite
/// bound, that bound.
fn quantile(buckets: &[(f64, u64)], q: f64) -> f64 {
    let Some(&(_, total)) = buckets.last() else {
        return 0.0;
    };
    if total == 0 {
        return 0.0;
    }
    let rank = q * total as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for &(bound, count) in buckets {
        if count as f64 >= rank {
            if bound.is_infinite() {
                return lower * 1e6;
            }
            let within = (count - below) as f64;
            let fraction = if within > 0.0 {
                (rank - below as f64) / within
            } else {
                1.0
            };
            return (lower + (bound - lower) * fraction.clamp(0.0, 1.0)) * 1e6;
        }
        if bound.is_finite() {
            lower = bound;
        }
        below = count;
    }
    lower * 1e6
}

/// Prints the budget as a table.
pub(crate) fn print(figures: &[StageFigures]) {
    println!("  latency budget (the gateway's /metrics over the measured window):");
    println!(
        "    {:<11} {:>9} {:>10} {:>10} {:>10}",
        "stage", "samples", "mean µs", "p50 µs", "p99 µs"
    );
    for f in figures {
        println!(
            "    {:<11} {:>9} {:>10.0} {:>10.0} {:>10.0}",
            f.stage, f.samples, f.mean_us, f.p50_us, f.p99_us
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "\
ruyi_message_stage_seconds_bucket{stage=\"write\",le=\"0.0001\"} 0
ruyi_message_stage_seconds_bucket{stage=\"write\",le=\"0.00025\"} 10
ruyi_message_stage_seconds_bucket{stage=\"write\",le=\"0.0005\"} 10
ruyi_message_stage_seconds_bucket{stage=\"write\",le=\"+Inf\"} 10
ruyi_message_stage_seconds_sum{stage=\"write\"} 0.002
ruyi_message_stage_seconds_count{stage=\"write\"} 10
";

    const AFTER: &str = "\
# HELP ruyi_message_stage_seconds Time each stage took.
ruyi_storage_commit_seconds_bucket{le=\"0.0001\"} 7
ruyi_message_stage_seconds_bucket{stage=\"write\",le=\"0.0001\"} 0
ruyi_message_stage_seconds_bucket{stage=\"write\",le=\"0.00025\"} 10
ruyi_message_stage_seconds_bucket{stage=\"write\",le=\"0.0005\"} 110
ruyi_message_stage_seconds_bucket{stage=\"write\",le=\"+Inf\"} 111
ruyi_message_stage_seconds_sum{stage=\"write\"} 0.0424
ruyi_message_stage_seconds_count{stage=\"write\"} 111
ruyi_message_stage_seconds_bucket{stage=\"route\",le=\"0.0001\"} 4
ruyi_message_stage_seconds_bucket{stage=\"route\",le=\"+Inf\"} 4
ruyi_message_stage_seconds_sum{stage=\"route\"} 0.0001
";

    #[test]
    fn the_budget_is_the_difference_of_two_scrapes_per_stage() {
        let figures = between(&parse(BEFORE), &parse(AFTER));
        assert_eq!(figures.len(), 2);
        let write = &figures[0];
        assert_eq!(write.stage, "write");
        assert_eq!(write.samples, 101);
        assert!((write.mean_us - 400.0).abs() < 1e-6, "{}", write.mean_us);
        // 101 new samples: 100 in (250, 500] µs and one beyond 500 µs.
        assert!((write.p50_us - 376.25).abs() < 0.01, "{}", write.p50_us);
        assert!((write.p99_us - 500.0).abs() < 1.0, "{}", write.p99_us);
        let route = &figures[1];
        assert_eq!((route.stage.as_str(), route.samples), ("route", 4));
        assert!((route.p50_us - 50.0).abs() < 1e-6, "{}", route.p50_us);
    }

    #[test]
    fn a_quantile_past_the_last_bound_is_that_bound_and_no_samples_is_zero() {
        let buckets = [(0.001, 1), (f64::INFINITY, 100)];
        assert!((quantile(&buckets, 0.5) - 1000.0).abs() < 1e-6);
        assert_eq!(quantile(&[(0.001, 0), (f64::INFINITY, 0)], 0.99), 0.0);
    }
}
