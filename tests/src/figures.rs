//! Figures: what a suite measured, written where `cargo xtask chaos` collects them.
//!
//! Each figure is printed to stderr (visible with `--nocapture`) and, when the environment
//! variable [`FIGURES_ENV`] names a file, appended to it as one JSON line:
//! `{"suite":..,"figure":..,"value":..,"expect":..,"ok":..}`.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::sync::Mutex;

/// Names the file figures are appended to (JSON lines).
pub const FIGURES_ENV: &str = "KSYNC_FIGURES";

/// Serialises appends from the tests of one process (O_APPEND keeps lines whole across
/// processes; this keeps them whole within one).
static WRITE: Mutex<()> = Mutex::new(());

/// One measured figure.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Figure {
    /// The suite (e.g. `crash`, `disk`, `auth`).
    pub suite: String,
    /// What was measured (e.g. `acknowledged events lost`).
    pub figure: String,
    /// The measured value, as shown in the table (e.g. `0 of 10234`).
    pub value: String,
    /// The expectation (e.g. `0`).
    pub expect: String,
    /// Whether the value meets the expectation.
    pub ok: bool,
}

/// Records a figure. `ok` is the caller's verdict; the test still asserts on its own.
pub fn report(suite: &str, figure: &str, value: impl std::fmt::Display, expect: &str, ok: bool) {
    let fig = Figure {
        suite: suite.to_owned(),
        figure: figure.to_owned(),
        value: value.to_string(),
        expect: expect.to_owned(),
        ok,
    };
    eprintln!(
        "figure: [{}] {} = {} (expect {}){}",
        fig.suite,
        fig.figure,
        fig.value,
        fig.expect,
        if ok { "" } else { "  << NOT MET" }
    );
    let Some(path) = std::env::var_os(FIGURES_ENV) else {
        return;
    };
    let Ok(line) = serde_json::to_string(&fig) else {
        return;
    };
    let _guard = WRITE.lock().unwrap_or_else(|p| p.into_inner());
    match OpenOptions::new().create(true).append(true).open(&path) {
        Ok(mut file) => {
            if let Err(e) = writeln!(file, "{line}") {
                eprintln!("cannot append a figure to {}: {e}", path.to_string_lossy());
            }
        }
        Err(e) => eprintln!("cannot open {}: {e}", path.to_string_lossy()),
    }
}

/// Reads the figures in a JSON-lines file (lines that do not parse are skipped).
pub fn read(path: &std::path::Path) -> std::io::Result<Vec<Figure>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}
