//! A figure measured several times: its least, median and greatest value.

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    /// The spread of `samples`, NaN left out; None when no sample is left.
    pub fn of(samples: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut sorted: Vec<f64> = samples.into_iter().filter(|v| !v.is_nan()).collect();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Some(Spread {
            min: sorted[0],
            median,
            max: sorted[n - 1],
        })
    }

    /// `min / median / max unit`, each with `decimals` decimals.
    pub fn show(&self, decimals: usize, unit: &str) -> String {
        let Spread { min, median, max } = self;
        format!("{min:.decimals$} / {median:.decimals$} / {max:.decimals$} {unit}")
    }

    /// The same, each with its sign (a difference).
    pub fn show_signed(&self, decimals: usize, unit: &str) -> String {
        let Spread { min, median, max } = self;
        format!("{min:+.decimals$} / {median:+.decimals$} / {max:+.decimals$} {unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_least_the_median_and_the_greatest() {
        let odd = Spread::of([3.0, 1.0, f64::NAN, 2.0]).unwrap();
        assert_eq!((odd.min, odd.median, odd.max), (1.0, 2.0, 3.0));
        let even = Spread::of([4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(even.median, 2.5);
        assert_eq!(Spread::of([f64::NAN]), None);
        assert_eq!(even.show(1, "µs"), "1.0 / 2.5 / 4.0 µs");
        assert_eq!(
            Spread::of([-0.5, 1.5]).unwrap().show_signed(1, "µs"),
            "-0.5 / +0.5 / +1.5 µs"
        );
    }
}
