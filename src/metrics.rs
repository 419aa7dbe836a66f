//! The node's metrics: a lock-free latency histogram and the Prometheus
//! text exposition.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

/// Bucket bounds for latencies in microseconds: 50 µs to 1 s.
pub const LATENCY_BUCKETS_US: [u64; 13] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// A histogram with fixed bucket bounds, updated with relaxed atomics (no
/// lock on the write path). A bucket counts the observations `<=` its bound
/// and above the previous one; one more bucket holds those above the last
/// bound (`+Inf`).
///
/// The count is not kept apart: it is the sum of the buckets read in the
/// same snapshot, so the `+Inf` bucket always equals `_count` even while
/// writers are observing. `_sum` is read separately and may be a few
/// observations ahead or behind.
#[derive(Debug)]
pub struct Histogram {
    bounds: Box<[u64]>,
    /// `bounds.len() + 1` non-cumulative counts.
    buckets: Box<[AtomicU64]>,
    /// Wraps on overflow (2^64 µs is half a million years).
    sum: AtomicU64,
}

/// A histogram's values at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// The bucket bounds, without `+Inf`.
    pub bounds: Vec<u64>,
    /// Cumulative counts: `cumulative[i]` observations `<= bounds[i]`; the
    /// last one (`+Inf`) is the count.
    pub cumulative: Vec<u64>,
    pub sum: u64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        *self
            .cumulative
            .last()
            .expect("a histogram has a +Inf bucket")
    }
}

impl Histogram {
    /// A histogram with these bucket bounds (strictly increasing, at least
    /// one).
    pub fn new(bounds: &[u64]) -> Histogram {
        assert!(
            !bounds.is_empty(),
            "a histogram needs at least one bucket bound"
        );
        assert!(
            bounds.windows(2).all(|w| w[0] < w[1]),
            "histogram bucket bounds must increase strictly: {bounds:?}"
        );
        Histogram {
            bounds: bounds.into(),
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    /// A histogram of latencies in microseconds, [`LATENCY_BUCKETS_US`].
    pub fn latency_us() -> Histogram {
        Histogram::new(&LATENCY_BUCKETS_US)
    }

    pub fn observe(&self, value: u64) {
        let bucket = self.bounds.partition_point(|&bound| bound < value);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    /// [`Histogram::observe`] of a duration in microseconds (saturating).
    pub fn observe_duration_us(&self, duration: Duration) {
        self.observe(u64::try_from(duration.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0u64;
        let cumulative = self
            .buckets
            .iter()
            .map(|bucket| {
                total = total.wrapping_add(bucket.load(Ordering::Relaxed));
                total
            })
            .collect();
        HistogramSnapshot {
            bounds: self.bounds.to_vec(),
            cumulative,
            sum: self.sum.load(Ordering::Relaxed),
        }
    }

    /// Appends this histogram to `text` as the family `name` (see
    /// [`MetricsText::histogram`]).
    pub fn write(&self, text: &mut MetricsText, name: &str, help: &str, labels: &[(&str, &str)]) {
        text.histogram(name, help, labels, self);
    }
}

/// A sample value in the exposition format: integers exactly, floats with
/// `NaN`, `+Inf`, `-Inf`.
pub trait MetricValue {
    fn write_value(&self, out: &mut String);
}

macro_rules! integer_metric_value {
    ($($t:ty),*) => {$(
        impl MetricValue for $t {
            fn write_value(&self, out: &mut String) {
                let _ = write!(out, "{self}");
            }
        }
    )*};
}
integer_metric_value!(u8, u16, u32, u64, usize, i8, i16, i32, i64, isize);

impl MetricValue for f64 {
    fn write_value(&self, out: &mut String) {
        if self.is_nan() {
            out.push_str("NaN");
        } else if self.is_infinite() {
            out.push_str(if *self > 0.0 { "+Inf" } else { "-Inf" });
        } else {
            // Rust prints the shortest form that reads back the same, never
            // with an exponent: valid for Prometheus.
            let _ = write!(out, "{self}");
        }
    }
}

impl MetricValue for f32 {
    fn write_value(&self, out: &mut String) {
        f64::from(*self).write_value(out);
    }
}

impl MetricValue for bool {
    fn write_value(&self, out: &mut String) {
        out.push(if *self { '1' } else { '0' });
    }
}

/// The type of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

/// Builds a Prometheus text exposition (format 0.0.4). Samples of one family
/// may be added at different times (e.g. one per volume); each family is
/// written as one group, `# HELP` and `# TYPE` first, in the order families
/// were first added. Label values and help texts are escaped.
///
/// Metric and label names are the program's own, so an invalid one, a
/// family re-declared with another type or help, or a series added twice
/// are bugs: they panic.
///
/// ```
/// # use nvmirror::admin::{Histogram, MetricsText};
/// let latency = Histogram::latency_us();
/// latency.observe(180);
/// let mut text = MetricsText::new();
/// text.counter("nvmirror_writes_total", "Writes acknowledged.", &[("volume", "vol0")], 7u64);
/// text.histogram("nvmirror_write_latency_us", "Write latency in microseconds.", &[], &latency);
/// let body = text.finish();
/// assert!(body.contains("nvmirror_writes_total{volume=\"vol0\"} 7\n"));
/// ```
#[derive(Debug, Default)]
pub struct MetricsText {
    families: Vec<Family>,
    /// Family name to its index in `families`.
    index: HashMap<String, usize>,
    /// Names the families' samples use.
    sample_names: HashSet<String>,
}

#[derive(Debug)]
struct Family {
    name: String,
    help: String,
    kind: MetricKind,
    /// Rendered label sets already present, to refuse duplicate series.
    series: HashSet<String>,
    samples: String,
}

impl MetricsText {
    pub fn new() -> MetricsText {
        MetricsText::default()
    }

    pub fn counter(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        value: impl MetricValue,
    ) {
        self.sample(MetricKind::Counter, name, help, labels, &value);
    }

    pub fn gauge(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        value: impl MetricValue,
    ) {
        self.sample(MetricKind::Gauge, name, help, labels, &value);
    }

    /// `name_bucket{…,le="…"}` for each bound and `+Inf` (cumulative),
    /// `name_sum`, `name_count`.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        histogram: &Histogram,
    ) {
        assert!(
            labels.iter().all(|(label, _)| *label != "le"),
            "`le` is reserved in histogram {name}"
        );
        let snapshot = histogram.snapshot();
        let rendered = render_labels(labels, None);
        let family = self.family(MetricKind::Histogram, name, help);
        assert!(
            family.series.insert(rendered.clone()),
            "series {name}{rendered} added twice"
        );
        let samples = &mut family.samples;
        let les = snapshot
            .bounds
            .iter()
            .map(|bound| bound.to_string())
            .chain(std::iter::once("+Inf".to_owned()));
        for (le, count) in les.zip(&snapshot.cumulative) {
            let _ = writeln!(
                samples,
                "{name}_bucket{} {count}",
                render_labels(labels, Some(&le))
            );
        }
        let _ = writeln!(samples, "{name}_sum{rendered} {}", snapshot.sum);
        let _ = writeln!(samples, "{name}_count{rendered} {}", snapshot.count());
    }

    /// The exposition text.
    pub fn finish(self) -> String {
        let mut out = String::new();
        for family in &self.families {
            let _ = writeln!(out, "# HELP {} {}", family.name, escape_help(&family.help));
            let _ = writeln!(out, "# TYPE {} {}", family.name, family.kind.as_str());
            out.push_str(&family.samples);
        }
        out
    }

    fn sample(
        &mut self,
        kind: MetricKind,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        value: &dyn MetricValue,
    ) {
        let rendered = render_labels(labels, None);
        let family = self.family(kind, name, help);
        assert!(
            family.series.insert(rendered.clone()),
            "series {name}{rendered} added twice"
        );
        let _ = write!(family.samples, "{name}{rendered} ");
        value.write_value(&mut family.samples);
        family.samples.push('\n');
    }

    fn family(&mut self, kind: MetricKind, name: &str, help: &str) -> &mut Family {
        assert!(is_metric_name(name), "invalid metric name {name:?}");
        let index = match self.index.get(name) {
            Some(&index) => {
                let family = &self.families[index];
                assert!(
                    family.kind == kind && family.help == help,
                    "metric {name} declared twice with different type or help"
                );
                index
            }
            None => {
                // Sample names are unique across families (a histogram's
                // take its name with suffixes).
                for sample_name in sample_names(kind, name) {
                    assert!(
                        self.sample_names.insert(sample_name.clone()),
                        "metric {name}: sample name {sample_name} is taken by another family"
                    );
                }
                self.families.push(Family {
                    name: name.to_owned(),
                    help: help.to_owned(),
                    kind,
                    series: HashSet::new(),
                    samples: String::new(),
                });
                self.index.insert(name.to_owned(), self.families.len() - 1);
                self.families.len() - 1
            }
        };
        &mut self.families[index]
    }
}

fn sample_names(kind: MetricKind, name: &str) -> Vec<String> {
    match kind {
        MetricKind::Histogram => ["_bucket", "_sum", "_count"]
            .iter()
            .map(|suffix| format!("{name}{suffix}"))
            .collect(),
        MetricKind::Counter | MetricKind::Gauge => vec![name.to_owned()],
    }
}

/// `{a="x",b="y"}` (with `le` last, if given), or nothing without labels.
fn render_labels(labels: &[(&str, &str)], le: Option<&str>) -> String {
    if labels.is_empty() && le.is_none() {
        return String::new();
    }
    let mut out = String::from("{");
    let mut seen = HashSet::new();
    for (index, (label, value)) in labels.iter().enumerate() {
        assert!(is_label_name(label), "invalid label name {label:?}");
        assert!(seen.insert(*label), "label {label} given twice");
        if index > 0 {
            out.push(',');
        }
        let _ = write!(out, "{label}=\"{}\"", escape_label_value(value));
    }
    if let Some(le) = le {
        if !labels.is_empty() {
            out.push(',');
        }
        let _ = write!(out, "le=\"{le}\"");
    }
    out.push('}');
    out
}

/// Label values: `\` → `\\`, `"` → `\"`, newline → `\n`.
fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Help text: `\` → `\\`, newline → `\n`.
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
fn is_metric_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, not starting with `__` (reserved).
fn is_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    !name.starts_with("__")
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    // -- Metrics -----------------------------------------------------------

    #[test]
    fn histogram_counts_into_buckets() {
        let histogram = Histogram::new(&[10, 20, 30]);
        for value in [0, 10, 11, 20, 25, 30, 31, 1000] {
            histogram.observe(value);
        }
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.bounds, vec![10, 20, 30]);
        // <=10: 0, 10; <=20: +11, 20; <=30: +25, 30; +Inf: +31, 1000.
        assert_eq!(snapshot.cumulative, vec![2, 4, 6, 8]);
        assert_eq!(snapshot.count(), 8);
        assert_eq!(snapshot.sum, 10 + 11 + 20 + 25 + 30 + 31 + 1000);

        let latency = Histogram::latency_us();
        latency.observe_duration_us(Duration::from_micros(75));
        latency.observe_duration_us(Duration::from_secs(5));
        let snapshot = latency.snapshot();
        assert_eq!(snapshot.cumulative[0], 0);
        assert_eq!(snapshot.cumulative[1], 1);
        assert_eq!(snapshot.cumulative[LATENCY_BUCKETS_US.len() - 1], 1);
        assert_eq!(snapshot.count(), 2);
        assert_eq!(snapshot.sum, 5_000_075);
    }

    #[test]
    fn histogram_writes_cumulative_buckets() {
        let histogram = Histogram::new(&[10, 20]);
        for value in [5, 15, 15, 100] {
            histogram.observe(value);
        }
        let mut text = MetricsText::new();
        histogram.write(&mut text, "op_latency_us", "Latency.", &[("op", "write")]);
        assert_eq!(
            text.finish(),
            "# HELP op_latency_us Latency.\n\
             # TYPE op_latency_us histogram\n\
             op_latency_us_bucket{op=\"write\",le=\"10\"} 1\n\
             op_latency_us_bucket{op=\"write\",le=\"20\"} 3\n\
             op_latency_us_bucket{op=\"write\",le=\"+Inf\"} 4\n\
             op_latency_us_sum{op=\"write\"} 135\n\
             op_latency_us_count{op=\"write\"} 4\n"
        );
    }

    #[test]
    fn histogram_is_consistent_under_concurrent_observers() {
        let histogram = Arc::new(Histogram::latency_us());
        let writers: Vec<_> = (0..4u64)
            .map(|t| {
                let histogram = Arc::clone(&histogram);
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        histogram.observe((i * 7919 + t) % 2_000_000);
                    }
                })
            })
            .collect();
        for _ in 0..50 {
            let snapshot = histogram.snapshot();
            assert!(snapshot.cumulative.windows(2).all(|w| w[0] <= w[1]));
        }
        for writer in writers {
            writer.join().unwrap();
        }
        assert_eq!(histogram.snapshot().count(), 80_000);
    }

    #[test]
    fn escapes_label_values_and_help() {
        let mut text = MetricsText::new();
        text.gauge(
            "volume_dirty_bytes",
            "Dirty bytes.\nNot yet flushed by a CP (C:\\).",
            &[("volume", "a\\b\"c\nd"), ("node", "1")],
            1.5,
        );
        assert_eq!(
            text.finish(),
            "# HELP volume_dirty_bytes Dirty bytes.\\nNot yet flushed by a CP (C:\\\\).\n\
             # TYPE volume_dirty_bytes gauge\n\
             volume_dirty_bytes{volume=\"a\\\\b\\\"c\\nd\",node=\"1\"} 1.5\n"
        );
        let mut out = String::new();
        for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.1, 1e21, -2.0] {
            value.write_value(&mut out);
            out.push(' ');
        }
        assert_eq!(out, "NaN +Inf -Inf 0.1 1000000000000000000000 -2 ");
    }

    #[test]
    #[should_panic(expected = "declared twice")]
    fn refuses_a_family_with_two_types() {
        let mut text = MetricsText::new();
        text.counter("x_total", "X.", &[], 1u64);
        text.gauge("x_total", "X.", &[("a", "b")], 1u64);
    }

    #[test]
    #[should_panic(expected = "added twice")]
    fn refuses_a_series_twice() {
        let mut text = MetricsText::new();
        text.counter("x_total", "X.", &[("a", "b")], 1u64);
        text.counter("x_total", "X.", &[("a", "b")], 2u64);
    }

    #[test]
    #[should_panic(expected = "taken by another family")]
    fn refuses_a_name_clashing_with_a_histogram() {
        let mut text = MetricsText::new();
        text.histogram("lat", "L.", &[], &Histogram::new(&[1]));
        text.counter("lat_count", "C.", &[], 1u64);
    }

    #[test]
    #[should_panic(expected = "invalid label name")]
    fn refuses_a_bad_label_name() {
        MetricsText::new().gauge("g", "G.", &[("no-dash", "x")], 1u64);
    }

    #[test]
    fn names() {
        assert!(is_metric_name("nvmirror:log_bytes_total") && is_metric_name("_x1"));
        assert!(!is_metric_name("") && !is_metric_name("1x") && !is_metric_name("a-b"));
        assert!(is_label_name("volume") && is_label_name("_v"));
        assert!(!is_label_name("__name__") && !is_label_name("a:b") && !is_label_name("9"));
    }

    /// A realistic exposition, the way the node builds one: families
    /// interleaved as code adds them, a histogram per volume, odd label
    /// values.
    fn sample_exposition() -> String {
        let writes = Histogram::latency_us();
        let reads = Histogram::latency_us();
        for i in 0..1000u64 {
            writes.observe(i * i);
            reads.observe(i * 37);
        }
        let mut text = MetricsText::new();
        for (volume, histogram) in [("vol0", &writes), ("we\"ird\\vol\nx", &reads)] {
            text.counter(
                "nvmirror_writes_total",
                "Writes acknowledged.",
                &[("volume", volume)],
                histogram.snapshot().count(),
            );
            text.histogram(
                "nvmirror_write_latency_us",
                "Write latency in microseconds, acknowledged to the client.",
                &[("volume", volume)],
                histogram,
            );
            text.gauge(
                "nvmirror_dirty_bytes",
                "Bytes not yet flushed.",
                &[("volume", volume)],
                4096u64,
            );
        }
        text.gauge(
            "nvmirror_mirror_in_sync",
            "1 when the mirror is in sync.",
            &[],
            true,
        );
        text.gauge(
            "nvmirror_log_used_ratio",
            "Used part of the filling half.",
            &[],
            0.032,
        );
        text.finish()
    }

    #[test]
    fn exposition_is_valid() {
        let text = sample_exposition();
        let families = validate_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(
            families,
            vec![
                "nvmirror_writes_total",
                "nvmirror_write_latency_us",
                "nvmirror_dirty_bytes",
                "nvmirror_mirror_in_sync",
                "nvmirror_log_used_ratio"
            ]
        );
        // The validator does catch errors.
        let broken = [
            "x 1\n",                                              // no TYPE
            "# TYPE x gauge\nx{a=\"b} 1\n",                       // unterminated
            "# TYPE x gauge\nx{a=\"\\t\"} 1\n",                   // bad escape
            "# TYPE x gauge\nx one\n",                            // bad value
            "# TYPE x gauge\n# TYPE y gauge\ny 1\nx 1\n",         // x not grouped
            "# TYPE x gauge\nx 1\n# HELP x late\n",               // HELP after samples
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 0\n",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_count 1\nh_sum 0\n", // no +Inf
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 1\nh_sum 0\n",
        ];
        for text in broken {
            assert!(validate_exposition(text).is_err(), "accepted:\n{text}");
        }
    }

    /// Checks the text exposition format 0.0.4 line by line; returns the
    /// families in order.
    fn validate_exposition(text: &str) -> Result<Vec<String>, String> {
        #[derive(Default)]
        struct Histo {
            /// (le, cumulative count) in order.
            buckets: Vec<(f64, f64)>,
            count: Option<f64>,
            sum: bool,
        }
        if !text.ends_with('\n') {
            return Err("no final newline".into());
        }
        let mut families: Vec<String> = Vec::new();
        let mut types: HashMap<String, String> = HashMap::new();
        let mut helped: HashSet<String> = HashSet::new();
        let mut with_samples: HashSet<String> = HashSet::new();
        let mut current: Option<String> = None;
        // Per histogram family and label set (without le).
        let mut histograms: HashMap<(String, String), Histo> = HashMap::new();
        let switch_to = |family: &str, current: &mut Option<String>, families: &mut Vec<String>| {
            if current.as_deref() != Some(family) {
                if families.iter().any(|f| f == family) {
                    return Err(format!("family {family} is not one group"));
                }
                families.push(family.to_owned());
                *current = Some(family.to_owned());
            }
            Ok(())
        };
        for (number, line) in text.lines().enumerate() {
            let at = |e: String| format!("line {}: {e}: {line:?}", number + 1);
            if let Some(rest) = line.strip_prefix("# ") {
                let mut words = rest.splitn(3, ' ');
                let (keyword, name) = (words.next().unwrap(), words.next().unwrap_or(""));
                match keyword {
                    "HELP" | "TYPE" => {
                        if !is_metric_name(name) {
                            return Err(at("bad name".into()));
                        }
                        switch_to(name, &mut current, &mut families).map_err(at)?;
                        if with_samples.contains(name) {
                            return Err(at(format!("{keyword} after samples")));
                        }
                    }
                    _ => continue,
                }
                if keyword == "TYPE" {
                    let kind = words.next().unwrap_or("");
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(at("bad type".into()));
                    }
                    if types.insert(name.to_owned(), kind.to_owned()).is_some() {
                        return Err(at("TYPE twice".into()));
                    }
                } else if !helped.insert(name.to_owned()) {
                    return Err(at("HELP twice".into()));
                }
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                return Err(at("unexpected line".into()));
            }
            // name{labels} value
            let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
            let name = &line[..name_end];
            if !is_metric_name(name) {
                return Err(at("bad metric name".into()));
            }
            let mut rest = &line[name_end..];
            let mut labels: Vec<(String, String)> = Vec::new();
            if let Some(after) = rest.strip_prefix('{') {
                rest = after;
                loop {
                    if let Some(after) = rest.strip_prefix('}') {
                        rest = after;
                        break;
                    }
                    let eq = rest.find("=\"").ok_or_else(|| at("bad label".into()))?;
                    let label = &rest[..eq];
                    if !is_label_name(label) && label != "le" {
                        return Err(at("bad label name".into()));
                    }
                    let mut value = String::new();
                    let mut chars = rest[eq + 2..].char_indices();
                    let end = loop {
                        match chars.next() {
                            None => return Err(at("unterminated label value".into())),
                            Some((i, '"')) => break eq + 2 + i + 1,
                            Some((_, '\\')) => match chars.next() {
                                Some((_, '\\')) => value.push('\\'),
                                Some((_, '"')) => value.push('"'),
                                Some((_, 'n')) => value.push('\n'),
                                _ => return Err(at("bad escape".into())),
                            },
                            Some((_, c)) => value.push(c),
                        }
                    };
                    labels.push((label.to_owned(), value));
                    rest = &rest[end..];
                    rest = rest.strip_prefix(',').unwrap_or(rest);
                }
            }
            let value = rest
                .strip_prefix(' ')
                .ok_or_else(|| at("no space before value".into()))?;
            let value: f64 = match value {
                "NaN" => f64::NAN,
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().map_err(|_| at("bad value".into()))?,
            };
            // Which family: a histogram's suffixed samples belong to it.
            let (family, suffix) = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    let base = name.strip_suffix(s)?;
                    (types.get(base).map(String::as_str) == Some("histogram")).then_some((base, *s))
                })
                .unwrap_or((name, ""));
            let kind = types
                .get(family)
                .ok_or_else(|| at("sample before its TYPE".into()))?;
            if kind == "histogram" && suffix.is_empty() {
                return Err(at("histogram sample without a suffix".into()));
            }
            switch_to(family, &mut current, &mut families).map_err(at)?;
            with_samples.insert(family.to_owned());
            if kind == "histogram" {
                let le = labels.iter().position(|(l, _)| l == "le");
                let le = le.map(|i| labels.remove(i).1);
                let key = (family.to_owned(), format!("{labels:?}"));
                let histo = histograms.entry(key).or_default();
                match (suffix, le) {
                    ("_bucket", Some(le)) => {
                        let le: f64 = if le == "+Inf" {
                            f64::INFINITY
                        } else {
                            le.parse().map_err(|_| at("bad le".into()))?
                        };
                        if let Some(&(last_le, last_count)) = histo.buckets.last() {
                            if le <= last_le || value < last_count {
                                return Err(at("buckets not monotonic".into()));
                            }
                        }
                        histo.buckets.push((le, value));
                    }
                    ("_sum", None) => histo.sum = true,
                    ("_count", None) => histo.count = Some(value),
                    _ => return Err(at("bad histogram sample".into())),
                }
            } else if labels.iter().any(|(l, _)| l == "le") {
                return Err(at("le outside a histogram".into()));
            }
        }
        for ((family, labels), histo) in &histograms {
            let what = format!("histogram {family}{labels}");
            let Some(&(last_le, last_count)) = histo.buckets.last() else {
                return Err(format!("{what} has no buckets"));
            };
            if last_le != f64::INFINITY {
                return Err(format!("{what} does not end with le=\"+Inf\""));
            }
            if histo.count != Some(last_count) || !histo.sum {
                return Err(format!(
                    "{what}: _count and _sum must follow, +Inf == _count"
                ));
            }
        }
        for family in &families {
            if !types.contains_key(family) || !helped.contains(family) {
                return Err(format!("{family} lacks HELP or TYPE"));
            }
        }
        Ok(families)
    }
}
