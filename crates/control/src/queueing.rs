//! How long requests would wait for a slot, for the policy to size a pool by the wait its TTFT
//! target allows rather than by a fixed utilization.
//!
//! `c` slots each complete `mu` requests per second (what the pool measured at `c` running
//! sequences, divided by `c`), requests arrive at `lambda` per second. The M/M/c queue (Erlang C)
//! assumes exponential service times; generation times are far more regular (a `max_tokens` most
//! answers reach makes them nearly constant), which shortens the queue. The Allen–Cunneen
//! approximation for the G/G/c queue corrects for that: the probability of waiting stays Erlang
//! C's and the wait scales by `(ca² + cs²) / 2`, the squared coefficients of variation of the
//! arrival and service times. Arrivals are taken as Poisson (`ca² = 1`); `cs²` is what the pool
//! measured ([`tidepool_sched::capacity::ServiceCurve`]), 1 (the M/M/c bound) until it has.
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

/// The seconds by which a share `q` (0.95 for the p95) of requests has started in an M/M/c
/// queue: 0 when at least that share never waits; `None` when the queue grows without bound.
pub fn wait_quantile(c: usize, lambda: f64, mu: f64, q: f64) -> Option<f64> {
    wait_quantile_g(c, lambda, mu, q, 1.0)
}

/// [`wait_quantile`] for service times whose squared coefficient of variation is `service_scv`
/// (1 for exponential ones, 0 for constant ones), Poisson arrivals: the Allen–Cunneen
/// correction scales every wait by `(1 + service_scv) / 2`. A `service_scv` that is not a
/// finite non-negative number counts as 1.
pub fn wait_quantile_g(c: usize, lambda: f64, mu: f64, q: f64, service_scv: f64) -> Option<f64> {
    let p = wait_probability(c, lambda, mu)?;
    let tail = 1.0 - q.clamp(0.0, 1.0);
    if p <= tail {
        return Some(0.0);
    }
    let scv = if service_scv.is_finite() && service_scv >= 0.0 {
        service_scv
    } else {
        1.0
    };
    // P(W > t) = p × exp(-(c mu - lambda) t / k), k = (ca² + cs²) / 2 with ca² = 1.
    let k = (1.0 + scv) / 2.0;
    Some(k * (p / tail).ln() / (c as f64 * mu - lambda))
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

    #[test]
    fn regular_service_times_wait_less_than_exponential_ones() {
        let mm = wait_quantile(2, 1.5, 1.0, 0.95).unwrap();
        assert!(mm > 0.0);
        // Exponential service is M/M/c itself.
        assert!(close(wait_quantile_g(2, 1.5, 1.0, 0.95, 1.0).unwrap(), mm));
        // Constant service: half the wait (Allen–Cunneen with Poisson arrivals).
        assert!(close(
            wait_quantile_g(2, 1.5, 1.0, 0.95, 0.0).unwrap(),
            mm / 2.0
        ));
        // More variable than exponential: longer.
        assert!(wait_quantile_g(2, 1.5, 1.0, 0.95, 3.0).unwrap() > mm);
        // Nonsense counts as exponential; no wait stays no wait; overload stays unbounded.
        assert!(close(
            wait_quantile_g(2, 1.5, 1.0, 0.95, f64::NAN).unwrap(),
            mm
        ));
        assert!(close(wait_quantile_g(2, 1.5, 1.0, 0.95, -1.0).unwrap(), mm));
        assert_eq!(wait_quantile_g(4, 0.1, 1.0, 0.95, 0.0), Some(0.0));
        assert_eq!(wait_quantile_g(1, 2.0, 1.0, 0.95, 0.0), None);
    }
}
