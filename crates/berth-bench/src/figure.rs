//! One line of the report: what was measured on Berth, the same on its baseline, and the
//! ratio of their medians.

use serde::Serialize;

use crate::interrupt;
use crate::stats::Summary;

#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub id: &'static str,
    pub title: String,
    pub unit: &'static str,
    /// Throughput: higher is better; everything else: lower is better.
    pub higher_is_better: bool,
    /// Show p99 next to the median (many samples of one thing at once).
    pub percentiles: bool,
    pub berth: Option<Summary>,
    /// What Berth is compared with ("OpenSSH", "Docker floor", ...).
    pub baseline_name: &'static str,
    pub baseline: Option<Summary>,
    /// Berth's median over the baseline's.
    pub ratio: Option<f64>,
    /// Both sides are differences (after − before), near zero: no ratio is made of them.
    pub difference: bool,
    pub note: String,
    pub error: Option<String>,
}

impl Figure {
    pub fn new(
        id: &'static str,
        title: impl Into<String>,
        unit: &'static str,
        baseline_name: &'static str,
    ) -> Self {
        Self {
            id,
            title: title.into(),
            unit,
            higher_is_better: false,
            percentiles: false,
            berth: None,
            baseline_name,
            baseline: None,
            ratio: None,
            difference: false,
            note: String::new(),
            error: None,
        }
    }

    pub fn higher_is_better(mut self) -> Self {
        self.higher_is_better = true;
        self
    }

    pub fn difference(mut self) -> Self {
        self.difference = true;
        self
    }

    pub fn percentiles(mut self) -> Self {
        self.percentiles = true;
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }

    /// Fills in both sides from their samples (what was gathered before an error counts,
    /// and the error is kept).
    pub fn with(
        mut self,
        berth: Vec<f64>,
        baseline: Vec<f64>,
        outcome: anyhow::Result<()>,
    ) -> Self {
        self.berth = Summary::of(berth);
        self.baseline = Summary::of(baseline);
        self.ratio = match (&self.berth, &self.baseline) {
            (Some(b), Some(o)) if o.median != 0.0 && !self.difference => Some(b.median / o.median),
            _ => None,
        };
        if let Err(e) = outcome {
            self.error = Some(format!("{e:#}"));
        }
        self
    }

    pub fn failed(mut self, e: &anyhow::Error) -> Self {
        self.error = Some(format!("{e:#}"));
        self
    }
}

/// Runs `berth` and `baseline` `runs` times each, alternating which goes first, so that
/// whatever else loads the machine meanwhile hits both alike.
pub fn interleave(
    runs: usize,
    berth_samples: &mut Vec<f64>,
    baseline_samples: &mut Vec<f64>,
    mut berth: impl FnMut() -> anyhow::Result<f64>,
    mut baseline: impl FnMut() -> anyhow::Result<f64>,
) -> anyhow::Result<()> {
    for i in 0..runs {
        interrupt::check()?;
        if i % 2 == 0 {
            berth_samples.push(berth()?);
            baseline_samples.push(baseline()?);
        } else {
            baseline_samples.push(baseline()?);
            berth_samples.push(berth()?);
        }
    }
    Ok(())
}
