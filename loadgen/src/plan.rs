//! A calls run's plan: when each call is due (the arrival rate, constant or in stages, and
//! how arrivals spread: evenly or as a Poisson process), how long each call talks, and a cap
//! on calls up at once. Every call is measured from its planned start, so a plan the
//! generator or the system cannot keep shows up as lateness and latency, not as a slower run.

use std::time::Duration;

use proto::rng::Rng;

/// One stage of a ramp: the arrival rate moves linearly to `to` per second over `secs`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stage {
    /// The stage's length, seconds.
    pub secs: f64,
    /// The rate at its end, per second.
    pub to: f64,
}

/// The arrival rate over time.
#[derive(Debug, Clone, PartialEq)]
pub enum Rate {
    /// The same rate throughout.
    Constant(f64),
    /// Stages from 0 per second (k6's ramping arrival rate): each ramps linearly from the
    /// previous stage's rate to its own.
    Stages(Vec<Stage>),
}

/// How arrivals spread over time at a given rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrivals {
    /// Evenly: the k-th call when k calls' worth of rate has passed.
    Even,
    /// A Poisson process (seeded): exponential gaps of mean 1/rate.
    Poisson {
        /// The generator's seed.
        seed: u64,
    },
}

/// How long each call talks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TalkDist {
    /// Every call the same.
    Fixed,
    /// Exponential, with the talk time as its mean (seeded).
    Exponential,
    /// Uniform from 0 to twice the talk time (seeded).
    Uniform,
}

/// When calls are due.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The rate over time.
    pub rate: Rate,
    /// How arrivals spread.
    pub arrivals: Arrivals,
    /// The calls (for a constant rate: as asked; for stages: what the stages hold).
    pub calls: u64,
}

impl Plan {
    /// `calls` calls at a constant `rate`.
    pub fn constant(rate: f64, calls: u64, arrivals: Arrivals) -> Plan {
        Plan { rate: Rate::Constant(rate), arrivals, calls }
    }

    /// The calls of `stages` (the expected count for Poisson arrivals, whose draw decides).
    pub fn stages(stages: Vec<Stage>, arrivals: Arrivals) -> Plan {
        let mut plan = Plan { rate: Rate::Stages(stages), arrivals, calls: 0 };
        plan.calls = plan.offsets_unbounded().count() as u64;
        plan
    }

    /// Seconds the stages last (a constant rate: the calls' span).
    pub fn secs(&self) -> f64 {
        match &self.rate {
            Rate::Constant(r) => self.calls as f64 / r,
            Rate::Stages(s) => s.iter().map(|s| s.secs).sum(),
        }
    }

    /// The mean rate over the plan, per second.
    pub fn mean_rate(&self) -> f64 {
        match &self.rate {
            Rate::Constant(r) => *r,
            Rate::Stages(_) => self.calls as f64 / self.secs().max(1e-9),
        }
    }

    /// Each call's planned start, from the plan's start, in order: exactly `calls` of them.
    pub fn offsets(&self) -> impl Iterator<Item = Duration> + '_ {
        self.offsets_unbounded().take(self.calls as usize)
    }

    /// The arrivals until the stages end (with a constant rate: without end).
    fn offsets_unbounded(&self) -> impl Iterator<Item = Duration> + '_ {
        let mut rng = match self.arrivals {
            Arrivals::Poisson { seed } => Some(Rng::new(seed)),
            Arrivals::Even => None,
        };
        // Arrivals at the points of "rate-time" 0, 1, 2, ... (even) or at the sums of
        // exponential gaps of mean 1 (Poisson), mapped back to time by the inverse of the
        // rate's integral.
        let mut x = 0.0f64;
        let mut first = true;
        std::iter::from_fn(move || {
            if !first {
                x += match rng.as_mut() {
                    Some(r) => exponential(r),
                    None => 1.0,
                };
            }
            first = false;
            self.at(x).map(Duration::from_secs_f64)
        })
    }

    /// The time at which `x` calls' worth of rate has passed (None past the last stage).
    fn at(&self, x: f64) -> Option<f64> {
        match &self.rate {
            Rate::Constant(r) => Some(x / r),
            Rate::Stages(stages) => {
                let (mut from, mut t0, mut left) = (0.0f64, 0.0f64, x);
                for s in stages {
                    let (a, b, len) = (from, s.to, s.secs);
                    let area = (a + b) / 2.0 * len;
                    if left < area {
                        // Solve a t + (b - a) t^2 / (2 len) = left within this stage.
                        let t = if (b - a).abs() < 1e-12 {
                            left / a
                        } else {
                            let k = (b - a) / len;
                            (-a + (a * a + 2.0 * k * left).max(0.0).sqrt()) / k
                        };
                        return Some(t0 + t.clamp(0.0, len));
                    }
                    left -= area;
                    t0 += len;
                    from = b;
                }
                None
            }
        }
    }
}

/// An exponential variate of mean 1.
fn exponential(rng: &mut Rng) -> f64 {
    // 53 random bits in (0, 1].
    let u = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    -u.ln()
}

/// Draws each call's talk time.
#[derive(Debug)]
pub struct Talk {
    mean: Duration,
    dist: TalkDist,
    rng: Rng,
}

impl Talk {
    /// Talk times of mean `mean` from `dist`, seeded.
    pub fn new(mean: Duration, dist: TalkDist, seed: u64) -> Talk {
        Talk { mean, dist, rng: Rng::new(seed ^ 0x7A1C_7A1C) }
    }

    /// The next call's talk time.
    pub fn next(&mut self) -> Duration {
        let m = self.mean.as_secs_f64();
        let secs = match self.dist {
            TalkDist::Fixed => m,
            TalkDist::Exponential => m * exponential(&mut self.rng),
            TalkDist::Uniform => 2.0 * m * ((self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64),
        };
        Duration::from_secs_f64(secs.min(86_400.0))
    }
}

/// The stages of a ramp, as `--stages` gives them.
#[derive(Debug, Clone, PartialEq)]
pub struct Stages(pub Vec<Stage>);

/// Parse `30s:1000,60s:5000,30s:0` (seconds may be written `30`, `30s`, `2m`): the value
/// parser of `--stages`.
pub fn parse_stages_arg(s: &str) -> Result<Stages, String> {
    parse_stages(s).map(Stages)
}

/// Parse `30s:1000,60s:5000,30s:0` into stages.
pub fn parse_stages(s: &str) -> Result<Vec<Stage>, String> {
    let mut stages = Vec::new();
    for part in s.split(',') {
        let (d, r) = part.split_once(':').ok_or_else(|| {
            format!("`{part}`: expected DURATION:RATE, e.g. 30s:1000 (ramp to 1000 calls/s over 30 s)")
        })?;
        let d = d.trim();
        let secs = match d.strip_suffix('m') {
            Some(m) => m.trim().parse::<f64>().map(|x| x * 60.0),
            None => d.strip_suffix('s').unwrap_or(d).trim().parse::<f64>(),
        }
        .map_err(|_| format!("`{d}` is not a duration (30, 30s or 2m)"))?;
        let to: f64 = r.trim().parse().map_err(|_| format!("`{r}` is not a rate"))?;
        if !(secs > 0.0 && secs <= 86_400.0) {
            return Err(format!("`{d}`: a stage lasts more than 0 s and at most a day"));
        }
        if !(0.0..=1e6).contains(&to) {
            return Err(format!("`{r}`: a rate is 0 to 1000000 per second"));
        }
        stages.push(Stage { secs, to });
    }
    if stages.iter().map(|s| s.secs).sum::<f64>() > 86_400.0 {
        return Err("the stages last more than a day".into());
    }
    Ok(stages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(plan: &Plan) -> Vec<f64> {
        plan.offsets().map(|d| d.as_secs_f64()).collect()
    }

    #[test]
    fn a_constant_rate_spreads_calls_evenly() {
        let p = Plan::constant(4.0, 5, Arrivals::Even);
        assert_eq!(secs(&p), [0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(p.mean_rate(), 4.0);
    }

    #[test]
    fn stages_ramp_linearly_and_hold_what_their_area_says() {
        // Up to 100/s over 10 s (500 calls), hold 100/s for 10 s (1,000), down to 0 over 10 s (500).
        let stages = parse_stages("10s:100,10:100,10s:0").unwrap();
        let p = Plan::stages(stages, Arrivals::Even);
        assert_eq!(p.calls, 2000);
        let t = secs(&p);
        // During the ramp the k-th call comes at sqrt(2 k 10 / 100) s.
        assert!((t[50] - (2.0f64 * 50.0 * 10.0 / 100.0).sqrt()).abs() < 1e-6, "{}", t[50]);
        // In the hold, one every 10 ms.
        assert!((t[1000] - t[999] - 0.01).abs() < 1e-6);
        assert!((t[500] - 10.0).abs() < 1e-6);
        assert!(t.windows(2).all(|w| w[0] <= w[1]), "in order");
        assert!(t.last().unwrap() < &30.0);
        assert!((p.mean_rate() - 2000.0 / 30.0).abs() < 1e-9);
    }

    #[test]
    fn poisson_arrivals_have_the_rate_and_exponential_gaps() {
        let p = Plan::constant(1000.0, 100_000, Arrivals::Poisson { seed: 7 });
        let t = secs(&p);
        let span = t.last().unwrap() - t[0];
        assert!((span - 100.0).abs() < 2.0, "100,000 calls at 1000/s take about 100 s: {span}");
        // An exponential gap is shorter than its mean (1 ms) with probability 1 - 1/e.
        let short = t.windows(2).filter(|w| w[1] - w[0] < 0.001).count() as f64 / (t.len() - 1) as f64;
        assert!((short - (1.0 - (-1.0f64).exp())).abs() < 0.01, "{short}");
        assert_eq!(secs(&Plan::constant(1000.0, 100, Arrivals::Poisson { seed: 7 })), t[..100], "seeded");
        assert_ne!(secs(&Plan::constant(1000.0, 100, Arrivals::Poisson { seed: 8 })), t[..100]);
    }

    #[test]
    fn talk_times_follow_their_distribution() {
        let mean = Duration::from_secs(2);
        let draw = |dist| {
            let mut t = Talk::new(mean, dist, 3);
            (0..20_000).map(|_| t.next().as_secs_f64()).collect::<Vec<_>>()
        };
        assert!(draw(TalkDist::Fixed).iter().all(|&x| x == 2.0));
        for dist in [TalkDist::Exponential, TalkDist::Uniform] {
            let xs = draw(dist);
            let m = xs.iter().sum::<f64>() / xs.len() as f64;
            assert!((m - 2.0).abs() < 0.06, "{dist:?}: mean {m}");
        }
        assert!(draw(TalkDist::Uniform).iter().all(|&x| (0.0..4.0).contains(&x)));
    }

    #[test]
    fn bad_stages_say_what_is_wrong() {
        assert_eq!(parse_stages("2m:10").unwrap(), [Stage { secs: 120.0, to: 10.0 }]);
        for bad in ["30s", "x:10", "30s:y", "0s:10", "30s:-1", "100000s:1"] {
            assert!(parse_stages(bad).is_err(), "{bad}");
        }
    }
}
