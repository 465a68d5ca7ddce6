//! A value that changes only once a new one has held for a while.
//!
//! The sequence cap follows the measured service curve, whose levels move with every completed
//! request: on the 2-core build machine the cap went "one at a time", "none", "at most 4", "one at
//! a time", "at most 4" within 13 s of one ramp. A cap that flips every second is the curve's
//! noise, not a decision; [`Settled`] applies a new value only after every reading for `hold_s`
//! seconds has said it ([`Settled::awaiting`]: except the first, which replaces a placeholder at
//! once). Pure: the caller passes the time.

/// The settled value and the candidate that would replace it.
#[derive(Debug, Clone)]
pub struct Settled<T> {
    current: T,
    /// A different value and when it was first read without a break.
    pending: Option<(T, f64)>,
    hold_s: f64,
    /// `current` is a placeholder that the first different reading replaces at once.
    placeholder: bool,
}

impl<T> Settled<T> {
    /// Starts at `initial`; a different value must be read for `hold_s` seconds to replace it.
    pub fn new(initial: T, hold_s: f64) -> Settled<T> {
        Settled {
            current: initial,
            pending: None,
            hold_s: if hold_s.is_finite() {
                hold_s.max(0.0)
            } else {
                0.0
            },
            placeholder: false,
        }
    }

    /// Starts at `initial`, a placeholder (nothing read yet): the first different reading
    /// applies at once, and every later change waits `hold_s`. The first measurement is acted on;
    /// changing one's mind takes persistence.
    pub fn awaiting(initial: T, hold_s: f64) -> Settled<T> {
        Settled {
            placeholder: true,
            ..Settled::new(initial, hold_s)
        }
    }

    /// Reads `value` at `now` (seconds, from any fixed origin) and returns the settled value.
    /// A reading equal to the settled value, or a different candidate, restarts the wait.
    pub fn update(&mut self, now: f64, value: T) -> &T
    where
        T: PartialEq,
    {
        self.update_by(now, value, |a, b| a == b)
    }

    /// [`Settled::update`], with `same` saying which readings are one value: a reading the same
    /// as the settled value (or as the candidate) replaces it, so the latest figures of a value
    /// whose identity is part of it (a count, with its reason) are kept.
    pub fn update_by(&mut self, now: f64, value: T, same: impl Fn(&T, &T) -> bool) -> &T {
        if same(&value, &self.current) || std::mem::take(&mut self.placeholder) {
            self.pending = None;
            self.current = value;
            return &self.current;
        }
        let since = match self.pending.take() {
            Some((candidate, since)) if same(&candidate, &value) => since,
            _ => now,
        };
        if now - since >= self.hold_s {
            self.current = value;
        } else {
            self.pending = Some((value, since));
        }
        &self.current
    }

    /// The settled value.
    pub fn get(&self) -> &T {
        &self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_value_applies_once_it_has_held() {
        let mut cap = Settled::new(None, 5.0);
        assert_eq!(*cap.update(0.0, Some(1)), None);
        assert_eq!(*cap.update(4.0, Some(1)), None, "4 s is not 5");
        assert_eq!(*cap.update(5.0, Some(1)), Some(1));
        // Lifting it waits as long.
        assert_eq!(*cap.update(6.0, None), Some(1));
        assert_eq!(*cap.update(11.0, None), None);
    }

    #[test]
    fn a_flapping_reading_never_settles() {
        // The ramp's sequence: 1, none, 4, 1, 4, one reading a second.
        let mut cap = Settled::new(None, 5.0);
        let readings = [
            Some(1),
            None,
            Some(4),
            Some(1),
            Some(4),
            Some(1),
            Some(4),
            Some(1),
        ];
        for (t, r) in readings.into_iter().enumerate() {
            assert_eq!(*cap.update(t as f64, r), None, "at {t} s");
        }
        // A reading of the settled value also restarts the wait.
        let mut cap = Settled::new(Some(2), 5.0);
        cap.update(0.0, Some(4));
        cap.update(3.0, Some(2));
        assert_eq!(
            *cap.update(6.0, Some(4)),
            Some(2),
            "the wait began again at 6 s"
        );
        assert_eq!(*cap.update(11.0, Some(4)), Some(4));
        assert_eq!(*cap.get(), Some(4));
    }

    #[test]
    fn a_placeholder_gives_way_to_the_first_reading_at_once() {
        let mut cap = Settled::awaiting(None, 5.0);
        assert_eq!(
            *cap.update(0.0, None),
            None,
            "the same as the placeholder: still waiting"
        );
        assert_eq!(
            *cap.update(1.0, Some(2)),
            Some(2),
            "the first reading applies at once"
        );
        assert_eq!(*cap.update(2.0, None), Some(2), "the next change waits");
        assert_eq!(*cap.update(7.0, None), None);
    }

    #[test]
    fn a_reading_of_the_same_value_refreshes_its_figures() {
        // (count, reason): the count is the value, the reason's figures follow the readings.
        let same = |a: &(u32, &str), b: &(u32, &str)| a.0 == b.0;
        let mut cap = Settled::new((1, "at first"), 5.0);
        assert_eq!(*cap.update_by(0.0, (1, "later"), same), (1, "later"));
        assert_eq!(*cap.update_by(1.0, (4, "four"), same), (1, "later"));
        assert_eq!(*cap.update_by(3.0, (4, "four again"), same), (1, "later"));
        assert_eq!(
            *cap.update_by(6.0, (4, "four at last"), same),
            (4, "four at last"),
            "held since 1 s, with the newest figures"
        );
    }

    #[test]
    fn no_hold_follows_every_reading() {
        let mut v = Settled::new(0, 0.0);
        assert_eq!(*v.update(0.0, 3), 3);
        assert_eq!(
            *Settled::new(0, f64::NAN).update(0.0, 1),
            1,
            "NaN is no hold"
        );
    }
}
