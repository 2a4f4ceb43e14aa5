//! `--plot FILE.svg`: the latency distributions (send->SendAck and
//! send->delivery, by percentile, on a scale that spreads the tail) beside
//! the throughput second by second.

use crate::report::Report;
use anyhow::Context;
use hdrhistogram::Histogram;
use plotters::prelude::*;
use std::path::Path;

/// Percentile `q` (0..1) as "nines": 0 at the median's left edge, 1 at
/// p90, 2 at p99, 3 at p99.9.
fn nines(q: f64) -> f64 {
    -(1.0 - q).max(1e-6).log10()
}

fn distribution(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    h.iter_quantiles(4)
        .map(|v| {
            (
                nines(v.quantile_iterated_to()),
                v.value_iterated_to() as f64 / 1000.0,
            )
        })
        .filter(|&(x, _)| x <= 5.0)
        .collect()
}

pub(crate) fn draw(report: &Report, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE).context("drawing")?;
    let title = format!("ruyi-bench {} against {}", report.scenario, report.target);
    let root = root.titled(&title, ("sans-serif", 18)).context("drawing")?;
    let (left, right) = root.split_horizontally(600);

    let ack = distribution(&report.total.ack_latency_us);
    let delivery = distribution(&report.total.delivery_latency_us);
    let top = ack
        .iter()
        .chain(&delivery)
        .map(|&(_, y)| y)
        .fold(0.1, f64::max);
    let bottom = ack
        .iter()
        .chain(&delivery)
        .map(|&(_, y)| y)
        .fold(top, f64::min)
        .max(0.001);
    let right_edge = ack
        .iter()
        .chain(&delivery)
        .map(|&(x, _)| x)
        .fold(1.0, f64::max)
        .ceil();
    let mut chart = ChartBuilder::on(&left)
        .caption("latency by percentile", ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..right_edge, (bottom / 1.2..top * 1.2).log_scale())
        .context("drawing")?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("ms")
        .x_labels(right_edge as usize + 1)
        .x_label_formatter(&|x| format!("p{}", 100.0 - 100.0 * 10f64.powf(-x.round())))
        .draw()
        .context("drawing")?;
    chart
        .draw_series(LineSeries::new(ack, &BLUE))
        .context("drawing")?
        .label("send -> SendAck")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(delivery, &RED))
        .context("drawing")?
        .label("send -> delivery")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .context("drawing")?;

    let samples = &report.samples;
    let end = samples.last().map_or(1.0, |s| s.t_s).max(1.0);
    let peak = samples
        .iter()
        .map(|s| s.sends_per_s.max(s.deliveries_per_s))
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&right)
        .caption("throughput per second", ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..end, 0.0..peak * 1.1)
        .context("drawing")?;
    chart
        .configure_mesh()
        .x_desc("seconds since the start")
        .y_desc("per second")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .context("drawing")?;
    chart
        .draw_series(LineSeries::new(
            samples.iter().map(|s| (s.t_s, s.sends_per_s)),
            &BLUE,
        ))
        .context("drawing")?
        .label("acked sends/s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(
            samples.iter().map(|s| (s.t_s, s.deliveries_per_s)),
            &RED,
        ))
        .context("drawing")?
        .label("deliveries/s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .context("drawing")?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::nines;

    #[test]
    fn nines_spread_the_tail() {
        assert!((nines(0.9) - 1.0).abs() < 1e-9);
        assert!((nines(0.999) - 3.0).abs() < 1e-9);
        assert_eq!(nines(1.0), 6.0);
    }
}
