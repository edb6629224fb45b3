//! The benchmark harness: every scenario runs kSync and its baseline in the same run,
//! alternating, and reports medians, min/max and ratios (machines here are shared and noisy, so
//! a lone absolute number means little).
//!
//! A scenario module exposes `pub fn run(report: &mut Report) -> Result<()>` and is listed in
//! [`SCENARIOS`]. `cargo xtask bench` builds this harness optimised; a debug build refuses to measure.
//! Results: a table on stdout and `target/bench/report.json`.

mod git;
mod p2p;
mod storage;
mod ws;

use std::path::PathBuf;

use anyhow::{Result, bail};
use serde::Serialize;

/// A scenario: name, what it compares, entry point.
type Scenario = (&'static str, &'static str, fn(&mut Report) -> Result<()>);

/// Every scenario, in the order `cargo xtask bench` runs them.
const SCENARIOS: &[Scenario] = &[
    (
        "storage",
        "FileStorage vs raw write+fdatasync / buffered writes; reopen of 1M events",
        storage::run,
    ),
    (
        "git",
        "push 100k events then clone them over HTTP vs the json+tcp floor and pouchdb-server",
        git::run,
    ),
    (
        "p2p",
        "4 libp2p peers: 10k events full speed and 500/s, catch-up of a fresh peer, vs the ws relay",
        p2p::run,
    ),
    (
        "ws",
        "fan-out to 1/10/100 subscribers: kSync relay (memory, file) vs bare tokio-tungstenite, nats-server, redis-server, Socket.IO 4; 10k idle connections",
        ws::run,
    ),
];

/// One measured series (e.g. "kSync group commit" events/s over 5 rounds).
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    /// What was measured, e.g. `ksync file group-commit`.
    pub name: String,
    /// Unit of the samples, e.g. `events/s` or `ms`.
    pub unit: String,
    /// Whether larger is better (throughput) or smaller (latency, time).
    pub higher_is_better: bool,
    /// Raw samples, one per round.
    pub samples: Vec<f64>,
    /// Median of the samples.
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
}

impl Series {
    /// Builds a series from its samples.
    pub fn new(name: &str, unit: &str, higher_is_better: bool, samples: Vec<f64>) -> Self {
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        let median = median_of_sorted(&sorted);
        Self {
            name: name.into(),
            unit: unit.into(),
            higher_is_better,
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
            median,
            samples,
        }
    }
}

/// Median of an already sorted slice (NaN when empty).
pub fn median_of_sorted(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// A percentile (0..=100) of unsorted samples, nearest-rank.
pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

/// A ratio between two series' medians, with the target it is checked against.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// e.g. `group commit / raw fdatasync loop`.
    pub name: String,
    /// `numerator.median / denominator.median`.
    pub value: f64,
    /// The target, e.g. `>= 0.8`, if there is one.
    pub target: Option<String>,
    /// Whether the target is met (None without target).
    pub met: Option<bool>,
}

/// A skipped baseline or scenario, with why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// What was skipped.
    pub name: String,
    /// Why.
    pub reason: String,
}

/// Everything one `cargo xtask bench` run measured.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Series per scenario.
    pub scenarios: Vec<ScenarioReport>,
}

/// One scenario's results.
#[derive(Debug, Default, Serialize)]
pub struct ScenarioReport {
    /// Scenario name (`storage`, `ws`, ...).
    pub scenario: String,
    /// Measured series.
    pub series: Vec<Series>,
    /// Ratios between series.
    pub ratios: Vec<Ratio>,
    /// Skipped baselines.
    pub skipped: Vec<Skipped>,
    /// Free-form facts (e.g. counts of deliveries checked).
    pub notes: Vec<String>,
}

impl Report {
    /// Starts a scenario section; later calls add to it.
    pub fn scenario(&mut self, name: &str) -> &mut ScenarioReport {
        self.scenarios.push(ScenarioReport {
            scenario: name.into(),
            ..Default::default()
        });
        let last = self.scenarios.len() - 1;
        &mut self.scenarios[last]
    }
}

impl ScenarioReport {
    /// Adds a series and returns its median.
    pub fn series(&mut self, series: Series) -> f64 {
        let median = series.median;
        self.series.push(series);
        median
    }

    /// Adds the ratio of two medians. `target_min` is the minimum acceptable ratio, if any.
    pub fn ratio(&mut self, name: &str, numerator: f64, denominator: f64, target_min: Option<f64>) {
        let value = numerator / denominator;
        self.ratios.push(Ratio {
            name: name.into(),
            value,
            target: target_min.map(|t| format!(">= {t}")),
            met: target_min.map(|t| value >= t),
        });
    }

    /// Adds a ratio where smaller is better (`value <= target_max`).
    pub fn ratio_max(&mut self, name: &str, numerator: f64, denominator: f64, target_max: f64) {
        let value = numerator / denominator;
        self.ratios.push(Ratio {
            name: name.into(),
            value,
            target: Some(format!("<= {target_max}")),
            met: Some(value <= target_max),
        });
    }

    /// Records a skipped baseline.
    pub fn skip(&mut self, name: &str, reason: &str) {
        eprintln!("skipped {name}: {reason}");
        self.skipped.push(Skipped {
            name: name.into(),
            reason: reason.into(),
        });
    }

    /// Records a free-form note.
    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }
}

/// `cargo xtask bench [scenario..]`.
pub fn run(args: &[String]) -> Result<()> {
    let wanted: Vec<&str> = args.iter().map(String::as_str).collect();
    for w in &wanted {
        if !SCENARIOS.iter().any(|(name, _, _)| name == w) {
            let known: Vec<_> = SCENARIOS.iter().map(|(n, _, _)| *n).collect();
            bail!("unknown bench scenario {w:?}; known: {known:?}");
        }
    }
    if cfg!(debug_assertions) && std::env::var_os("KSYNC_BENCH_ALLOW_DEBUG").is_none() {
        bail!(
            "benchmarks of a debug build measure the wrong thing: run `cargo xtask bench`, which \
             builds this harness optimised (KSYNC_BENCH_ALLOW_DEBUG=1 runs it anyway)"
        );
    }
    // A relay process of the ws scenario (ourselves, re-executed) serves; no header, no table.
    if let Some(served) = ws::serve_if_relay_child() {
        return served;
    }
    let mut report = Report::default();
    for (name, about, scenario) in SCENARIOS {
        if wanted.is_empty() || wanted.contains(name) {
            eprintln!("== bench {name}: {about}");
            scenario(&mut report)?;
        }
    }
    print_table(&report);
    let dir = PathBuf::from("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("report.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    println!("\nJSON written to {}", path.display());
    Ok(())
}

fn print_table(report: &Report) {
    for s in &report.scenarios {
        println!("\n## {}", s.scenario);
        println!(
            "{:<48} {:>14} {:>14} {:>14}  unit",
            "series", "median", "min", "max"
        );
        for x in &s.series {
            println!(
                "{:<48} {:>14.1} {:>14.1} {:>14.1}  {}",
                x.name, x.median, x.min, x.max, x.unit
            );
        }
        for r in &s.ratios {
            let verdict = match r.met {
                Some(true) => "met",
                Some(false) => "NOT met",
                None => "",
            };
            println!(
                "ratio {:<42} {:>8.3}  {} {}",
                r.name,
                r.value,
                r.target.as_deref().unwrap_or(""),
                verdict
            );
        }
        for k in &s.skipped {
            println!("skipped {}: {}", k.name, k.reason);
        }
        for n in &s.notes {
            println!("note: {n}");
        }
    }
}
