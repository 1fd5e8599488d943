//! A hand-written SVG of the latencies: the CDF of accept→delivered and accept→webhook
//! (against Prosody: send→delivered and send→receipt) on a logarithmic time axis (top), and
//! their per-second p50/p99 over the run (bottom). Plain `<polyline>`s, so any browser shows
//! it and the file stays small.

use std::fmt::Write;

use crate::tracker::SecondStats;

const W: f64 = 900.0;
const H: f64 = 680.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 40.0;
const DEVICE: &str = "#1f77b4";
const WEBHOOK: &str = "#d62728";

struct Panel {
    top: f64,
    height: f64,
}

impl Panel {
    fn width() -> f64 {
        W - LEFT - RIGHT
    }
    fn bottom(&self) -> f64 {
        self.top + self.height
    }
}

/// What the two curves are called: the runs against Pushgate and against Prosody measure from
/// a different start (the 202, the sender's write) to a different confirmation (the webhook
/// event, the receipt back at the sender).
pub struct Labels {
    /// `accept` or `send`.
    pub origin: &'static str,
    /// `accepted` or `sent`.
    pub origin_participle: &'static str,
    /// `acceptance` or `sending`.
    pub origin_noun: &'static str,
    /// What the second curve ends at.
    pub confirm: &'static str,
}

impl Labels {
    pub const PUSHGATE: Labels = Labels {
        origin: "accept",
        origin_participle: "accepted",
        origin_noun: "acceptance",
        confirm: "delivered event at the webhook",
    };
    pub const PROSODY: Labels = Labels {
        origin: "send",
        origin_participle: "sent",
        origin_noun: "sending",
        confirm: "receipt back at the sender",
    };
}

/// The SVG document. `device_us` and `confirm_us` are sorted latencies in µs.
pub fn render(
    title: &str,
    labels: &Labels,
    device_us: &[u64],
    confirm_us: &[u64],
    seconds: &[SecondStats],
) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' viewBox='0 0 {W} {H}' font-family='sans-serif' font-size='12'>\
         <rect width='100%' height='100%' fill='white'/>\
         <text x='{x}' y='22' font-size='15' text-anchor='middle'>{t}</text>",
        x = W / 2.0,
        t = xml_text(title)
    );
    cdf(
        &mut s,
        labels,
        &Panel {
            top: 50.0,
            height: 250.0,
        },
        device_us,
        confirm_us,
    );
    timeline(
        &mut s,
        labels,
        &Panel {
            top: 380.0,
            height: 240.0,
        },
        seconds,
    );
    legend(&mut s, labels, H - 18.0);
    s.push_str("</svg>\n");
    s
}

fn xml_text(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn axes(s: &mut String, p: &Panel, title: &str, x_label: &str) {
    let _ = write!(
        s,
        "<rect x='{LEFT}' y='{}' width='{}' height='{}' fill='none' stroke='#333'/>\
         <text x='{LEFT}' y='{}' font-size='13'>{}</text>\
         <text x='{}' y='{}' text-anchor='middle'>{}</text>",
        p.top,
        Panel::width(),
        p.height,
        p.top - 8.0,
        xml_text(title),
        LEFT + Panel::width() / 2.0,
        p.bottom() + 32.0,
        xml_text(x_label),
    );
}

fn polyline(s: &mut String, pts: &[(f64, f64)], color: &str, dashed: bool) {
    if pts.is_empty() {
        return;
    }
    let mut d = String::new();
    for (x, y) in pts {
        let _ = write!(d, "{x:.1},{y:.1} ");
    }
    let dash = if dashed {
        " stroke-dasharray='5,4'"
    } else {
        ""
    };
    let _ = write!(
        s,
        "<polyline points='{}' fill='none' stroke='{color}' stroke-width='1.8'{dash}/>",
        d.trim_end()
    );
}

/// CDF with a log10 x axis in ms, from the decade below the smallest value to the one above
/// the largest.
fn cdf(s: &mut String, labels: &Labels, p: &Panel, device_us: &[u64], webhook_us: &[u64]) {
    axes(
        s,
        p,
        &format!(
            "Latency CDF (share of {} messages)",
            labels.origin_participle
        ),
        "latency (log scale)",
    );
    let all_min = device_us
        .first()
        .into_iter()
        .chain(webhook_us.first())
        .min()
        .copied();
    let all_max = device_us
        .last()
        .into_iter()
        .chain(webhook_us.last())
        .max()
        .copied();
    let (Some(lo), Some(hi)) = (all_min, all_max) else {
        let _ = write!(
            s,
            "<text x='{}' y='{}' text-anchor='middle'>no latencies recorded</text>",
            LEFT + Panel::width() / 2.0,
            p.top + p.height / 2.0
        );
        return;
    };
    let lo_ms = (lo.max(10) as f64 / 1000.0).log10().floor();
    let hi_ms = (hi.max(10) as f64 / 1000.0).log10().ceil().max(lo_ms + 1.0);
    let x_of = |us: u64| {
        let v = (us.max(10) as f64 / 1000.0).log10();
        LEFT + (v - lo_ms) / (hi_ms - lo_ms) * Panel::width()
    };
    let y_of = |share: f64| p.bottom() - share * p.height;
    // grid: decades on x, quarters on y
    let mut decade = lo_ms;
    while decade <= hi_ms + 1e-9 {
        let x = LEFT + (decade - lo_ms) / (hi_ms - lo_ms) * Panel::width();
        let label = 10f64.powf(decade);
        let _ = write!(
            s,
            "<line x1='{x:.1}' y1='{}' x2='{x:.1}' y2='{}' stroke='#ddd'/>\
             <text x='{x:.1}' y='{}' text-anchor='middle'>{}</text>",
            p.top,
            p.bottom(),
            p.bottom() + 16.0,
            duration_label(label)
        );
        decade += 1.0;
    }
    for q in [0.25, 0.5, 0.75, 0.99] {
        let y = y_of(q);
        let _ = write!(
            s,
            "<line x1='{LEFT}' y1='{y:.1}' x2='{}' y2='{y:.1}' stroke='#ddd'/>\
             <text x='{}' y='{:.1}' text-anchor='end'>{}%</text>",
            LEFT + Panel::width(),
            LEFT - 6.0,
            y + 4.0,
            q * 100.0
        );
    }
    for (values, color) in [(device_us, DEVICE), (webhook_us, WEBHOOK)] {
        let n = values.len();
        if n == 0 {
            continue;
        }
        // at most ~400 points: every k-th value, plus the last
        let step = (n / 400).max(1);
        let mut pts: Vec<(f64, f64)> = (0..n)
            .step_by(step)
            .filter_map(|i| {
                values
                    .get(i)
                    .map(|v| (x_of(*v), y_of((i + 1) as f64 / n as f64)))
            })
            .collect();
        if let Some(v) = values.last() {
            pts.push((x_of(*v), y_of(1.0)));
        }
        polyline(s, &pts, color, false);
    }
}

/// One line of the timeline: which value, its colour, dashed or not.
type Series = (fn(&SecondStats) -> Option<f64>, &'static str, bool);

/// Per-second p50 (dashed) and p99 (solid) of the messages accepted in each second.
fn timeline(s: &mut String, labels: &Labels, p: &Panel, seconds: &[SecondStats]) {
    axes(
        s,
        p,
        &format!(
            "p50 (dashed) and p99 (solid) per second of {} (log scale)",
            labels.origin_noun
        ),
        "time since sending started (s)",
    );
    let series: [Series; 4] = [
        (|x| x.delivered_p50_ms, DEVICE, true),
        (|x| x.delivered_p99_ms, DEVICE, false),
        (|x| x.confirmed_p50_ms, WEBHOOK, true),
        (|x| x.confirmed_p99_ms, WEBHOOK, false),
    ];
    let values = || {
        seconds
            .iter()
            .flat_map(|x| series.iter().filter_map(move |(f, _, _)| f(x)))
    };
    // log scale: device latencies (ms) and webhook latencies (batching, 100s of ms) both show
    let (lo, hi) = match (values().reduce(f64::min), values().reduce(f64::max)) {
        (Some(min), Some(max)) => {
            let lo = min.max(0.01).log10().floor();
            (lo, max.max(0.01).log10().ceil().max(lo + 1.0))
        }
        _ => (0.0, 1.0),
    };
    let t_max = seconds.last().map_or(1.0, |x| x.t as f64 + 1.0).max(1.0);
    let x_of = |t: f64| LEFT + (t + 0.5) / t_max * Panel::width();
    let y_of = |v: f64| p.bottom() - (v.max(0.01).log10() - lo) / (hi - lo) * p.height;
    let mut decade = lo;
    while decade <= hi + 1e-9 {
        let v = 10f64.powf(decade);
        let y = y_of(v);
        let _ = write!(
            s,
            "<line x1='{LEFT}' y1='{y:.1}' x2='{}' y2='{y:.1}' stroke='#ddd'/>\
             <text x='{}' y='{:.1}' text-anchor='end'>{}</text>",
            LEFT + Panel::width(),
            LEFT - 6.0,
            y + 4.0,
            duration_label(v)
        );
        decade += 1.0;
    }
    let t_step = nice_ceiling(t_max / 10.0).max(1.0);
    let mut t = 0.0;
    while t <= t_max {
        let x = LEFT + t / t_max * Panel::width();
        let _ = write!(
            s,
            "<text x='{x:.1}' y='{}' text-anchor='middle'>{}</text>",
            p.bottom() + 16.0,
            trim_number(t)
        );
        t += t_step;
    }
    for (f, color, dashed) in series {
        let pts: Vec<(f64, f64)> = seconds
            .iter()
            .filter_map(|x| f(x).map(|v| (x_of(x.t as f64), y_of(v))))
            .collect();
        polyline(s, &pts, color, dashed);
    }
}

fn legend(s: &mut String, labels: &Labels, y: f64) {
    let _ = write!(
        s,
        "<line x1='{LEFT}' y1='{y}' x2='{}' y2='{y}' stroke='{DEVICE}' stroke-width='3'/>\
         <text x='{}' y='{}'>{o} → delivered at the device</text>\
         <line x1='{}' y1='{y}' x2='{}' y2='{y}' stroke='{WEBHOOK}' stroke-width='3'/>\
         <text x='{}' y='{}'>{o} → {c}</text>",
        LEFT + 30.0,
        LEFT + 36.0,
        y + 4.0,
        LEFT + 320.0,
        LEFT + 350.0,
        LEFT + 356.0,
        y + 4.0,
        o = labels.origin,
        c = xml_text(labels.confirm),
    );
}

/// 1, 2 or 5 times a power of ten, at least `v`.
fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

/// Milliseconds as a short label: `0.1 ms`, `20 ms`, `5 s`.
fn duration_label(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{} s", trim_number(ms / 1000.0))
    } else {
        format!("{} ms", trim_number(ms))
    }
}

fn trim_number(v: f64) -> String {
    if v >= 1.0 && (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_document() {
        let d: Vec<u64> = (1..=1000).map(|i| i * 30).collect();
        let w: Vec<u64> = (1..=1000).map(|i| i * 300).collect();
        let secs = vec![SecondStats {
            t: 0,
            accepted: 10,
            delivered: 10,
            confirmed: 10,
            delivered_p50_ms: Some(2.0),
            delivered_p99_ms: Some(9.0),
            confirmed_p50_ms: Some(150.0),
            confirmed_p99_ms: Some(240.0),
        }];
        let svg = render("a <title>", &Labels::PUSHGATE, &d, &w, &secs);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a &lt;title&gt;"));
        assert!(svg.contains("accept → delivered event at the webhook"));
        assert_eq!(svg.matches("<polyline").count(), 6);
        let prosody = render("p", &Labels::PROSODY, &d, &w, &secs);
        assert!(prosody.contains("send → receipt back at the sender"));
        assert!(prosody.contains("share of sent messages"));
        let empty = render("empty", &Labels::PUSHGATE, &[], &[], &[]);
        assert!(empty.contains("no latencies recorded"));
    }

    #[test]
    fn nice_numbers() {
        assert_eq!(nice_ceiling(0.7), 1.0);
        assert_eq!(nice_ceiling(13.0), 20.0);
        assert_eq!(nice_ceiling(260.0), 500.0);
        assert_eq!(trim_number(0.1), "0.1");
        assert_eq!(trim_number(100.0), "100");
        assert_eq!(duration_label(100.0), "100 ms");
        assert_eq!(duration_label(10000.0), "10 s");
    }
}
