//! Samples and what the report says about them: median, min, max and p99 over N.

use serde::Serialize;

/// A summary of one side of a figure (Berth or its baseline). The raw samples are kept for
/// the JSON so that anyone can recompute whatever they prefer.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub p99: f64,
    pub samples: Vec<f64>,
}

impl Summary {
    /// `None` when there is no sample at all.
    pub fn of(samples: Vec<f64>) -> Option<Self> {
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let min = *sorted.first()?;
        let max = *sorted.last()?;
        let median = if n % 2 == 1 {
            *sorted.get(n / 2)?
        } else {
            (sorted.get(n / 2 - 1)? + sorted.get(n / 2)?) / 2.0
        };
        Some(Self {
            n,
            median,
            min,
            max,
            p99: nearest_rank(&sorted, 0.99)?,
            samples,
        })
    }
}

/// The nearest-rank percentile of sorted samples (p in 0..=1).
fn nearest_rank(sorted: &[f64], p: f64) -> Option<f64> {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.saturating_sub(1)).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max_p99() {
        let s = Summary::of(vec![5.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(
            (s.n, s.median, s.min, s.max, s.p99),
            (4, 2.5, 1.0, 5.0, 5.0)
        );
        let s = Summary::of((1..=100).map(f64::from).collect()).unwrap();
        assert_eq!((s.median, s.p99), (50.5, 99.0));
        assert!(Summary::of(vec![]).is_none());
    }
}
