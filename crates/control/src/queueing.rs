//! How long requests would wait for a slot: the M/M/c queue (Erlang C), for the policy to size
//! a pool by the wait its TTFT target allows rather than by a fixed utilization.
//!
//! `c` slots each complete `mu` requests per second (what the pool measured at `c` running
//! sequences, divided by `c`), requests arrive at `lambda` per second. Generation times are not
//! exponential (a fixed `max_tokens` makes them nearly constant, which halves the wait), so the
//! figure is an upper bound on the real queue: the pool errs towards one worker more.
//!
//! Pure arithmetic.

/// The probability that an arriving request waits at all (Erlang's C formula), `None` when the
/// queue grows without bound (`lambda >= c × mu`).
pub fn wait_probability(c: usize, lambda: f64, mu: f64) -> Option<f64> {
    // NaN fails every comparison: written so that it is refused too.
    let valid = mu.is_finite() && mu > 0.0 && lambda.is_finite() && lambda >= 0.0;
    if c == 0 || !valid {
        return None;
    }
    let a = lambda / mu;
    let rho = a / c as f64;
    if rho >= 1.0 {
        return None;
    }
    // Σ_{k<c} a^k / k!, and a^c / c!, term by term (no factorials to overflow).
    let (mut sum, mut term) = (0.0, 1.0);
    for k in 0..c {
        sum += term;
        term *= a / (k + 1) as f64;
    }
    let last = term / (1.0 - rho);
    Some(last / (sum + last))
}

/// The seconds by which a share `q` (0.95 for the p95) of requests has started: 0 when at
/// least that share never waits; `None` when the queue grows without bound.
pub fn wait_quantile(c: usize, lambda: f64, mu: f64, q: f64) -> Option<f64> {
    let p = wait_probability(c, lambda, mu)?;
    let tail = 1.0 - q.clamp(0.0, 1.0);
    if p <= tail {
        return Some(0.0);
    }
    // P(W > t) = p × exp(-(c mu - lambda) t).
    Some((p / tail).ln() / (c as f64 * mu - lambda))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-3
    }

    #[test]
    fn one_slot_is_m_m_1() {
        // M/M/1: P(wait) = rho, P(W > t) = rho e^{-(mu - lambda) t}.
        let p = wait_probability(1, 0.72, 1.0).unwrap();
        assert!(close(p, 0.72), "{p}");
        let t = wait_quantile(1, 0.72, 1.0, 0.95).unwrap();
        assert!(close(t, (0.72f64 / 0.05).ln() / 0.28), "{t}");
    }

    #[test]
    fn known_erlang_c_values() {
        // Two servers, offered load 1 Erlang: C = 1/3.
        assert!(close(wait_probability(2, 1.0, 1.0).unwrap(), 1.0 / 3.0));
        // Ten servers, 8 Erlangs: C ≈ 0.409 (standard tables).
        let p = wait_probability(10, 8.0, 1.0).unwrap();
        assert!((p - 0.409).abs() < 0.002, "{p}");
    }

    #[test]
    fn more_slots_wait_less_and_an_overloaded_queue_has_no_answer() {
        let one = wait_quantile(1, 1.15, 1.6, 0.95).unwrap();
        let two = wait_quantile(2, 1.15, 1.2, 0.95).unwrap();
        let three = wait_quantile(3, 1.15, 1.0, 0.95).unwrap();
        assert!(one > two && two > three, "{one} {two} {three}");
        assert_eq!(
            wait_quantile(4, 0.1, 1.0, 0.95),
            Some(0.0),
            "hardly ever waits"
        );
        assert_eq!(wait_probability(1, 2.0, 1.0), None);
        assert_eq!(wait_quantile(2, 2.0, 1.0, 0.95), None);
        assert_eq!(wait_probability(0, 1.0, 1.0), None);
        assert_eq!(wait_probability(1, 1.0, 0.0), None);
    }
}
