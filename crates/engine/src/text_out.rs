//! Generated token bytes → text deltas for a stream.
//!
//! llama.cpp hands out each token as raw bytes, and a multi-byte UTF-8 character may be split
//! across tokens; stop strings may span tokens too. [`TextOut`] holds back the bytes of an
//! unfinished character and the tail that could still become a stop string, so every delta it
//! returns is whole characters that will never have to be taken back. Both engines use it:
//! mistral.rs 0.8.1 detects stop strings one token late and never trims a streamed answer at
//! them (`pipeline/sampling.rs`), so its text deltas go through here too. Pure: no engine here.

/// What one token's bytes produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Text safe to send now (may be empty).
    Text(String),
    /// A stop string was completed: the text before it is the last to send; the stop string and
    /// anything after it are dropped.
    Stop(String),
}

/// The text state of one sequence.
#[derive(Debug, Default)]
pub struct TextOut {
    /// Bytes of a character whose later bytes have not arrived yet.
    partial: Vec<u8>,
    /// Decoded text not sent yet, because it may be the start of a stop string.
    held: String,
    stops: Vec<String>,
    /// The stop string that ended the text, as an index into the `stops` given to [`TextOut::new`].
    matched: Option<usize>,
}

impl TextOut {
    pub fn new(stops: &[String]) -> TextOut {
        TextOut {
            partial: Vec::new(),
            held: String::new(),
            // Empty stop strings are never matched, but keep their place so indices are the
            // request's own.
            stops: stops.to_vec(),
            matched: None,
        }
    }

    /// Which stop string ended the text (its index in the request's list), once one has.
    pub fn matched_stop(&self) -> Option<usize> {
        self.matched
    }

    /// The finish reason of a text that a stop string ended.
    pub fn stop_reason(&self) -> crate::request::FinishReason {
        match self.matched {
            Some(i) => crate::request::FinishReason::StopSequence(i.min(u8::MAX as usize) as u8),
            None => crate::request::FinishReason::Stop,
        }
    }

    /// Adds one token's bytes.
    pub fn push(&mut self, piece: &[u8]) -> Step {
        self.partial.extend_from_slice(piece);
        self.decode_partial();
        if let Some((at, which)) = self.earliest_stop() {
            self.matched = Some(which);
            let before = self.held[..at].to_string();
            // What follows the stop string, an unfinished character included, is dropped.
            self.held.clear();
            self.partial.clear();
            return Step::Stop(before);
        }
        let keep = self.stop_prefix_len();
        let send = self.held.len() - keep;
        let out = self.held[..send].to_string();
        self.held.drain(..send);
        Step::Text(out)
    }

    /// The generation ended: everything still held (an unfinished character as U+FFFD).
    pub fn finish(&mut self) -> String {
        if !self.partial.is_empty() {
            self.held
                .push_str(&String::from_utf8_lossy(&std::mem::take(&mut self.partial)));
        }
        std::mem::take(&mut self.held)
    }

    /// Moves every complete character from `partial` to `held`; invalid bytes become U+FFFD.
    fn decode_partial(&mut self) {
        loop {
            match std::str::from_utf8(&self.partial) {
                Ok(s) => {
                    self.held.push_str(s);
                    self.partial.clear();
                    return;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // SAFETY-free: the prefix was just validated.
                    self.held
                        .push_str(std::str::from_utf8(&self.partial[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // An unfinished character at the end: wait for more bytes.
                        None => {
                            self.partial.drain(..valid);
                            return;
                        }
                        Some(bad) => {
                            self.held.push(char::REPLACEMENT_CHARACTER);
                            self.partial.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Where the earliest stop string starts in `held`, and which one it is.
    fn earliest_stop(&self) -> Option<(usize, usize)> {
        self.stops
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|at| (at, i)))
            .min()
    }

    /// Length of the longest tail of `held` that is a proper prefix of some stop string.
    fn stop_prefix_len(&self) -> usize {
        let mut best = 0;
        for stop in self.stops.iter().filter(|s| !s.is_empty()) {
            let max = stop.len().saturating_sub(1).min(self.held.len());
            for len in (best + 1..=max).rev() {
                let start = self.held.len() - len;
                if self.held.is_char_boundary(start) && stop.starts_with(&self.held[start..]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: Step) -> String {
        match s {
            Step::Text(t) => t,
            Step::Stop(t) => panic!("unexpected stop before {t:?}"),
        }
    }

    #[test]
    fn never_splits_a_character() {
        let mut out = TextOut::new(&[]);
        let e = "é".as_bytes();
        assert_eq!(text(out.push(b"caf")), "caf");
        assert_eq!(text(out.push(&e[..1])), "");
        assert_eq!(text(out.push(&e[1..])), "é");
        let crab = "🦀".as_bytes();
        assert_eq!(text(out.push(&crab[..3])), "");
        assert_eq!(text(out.push(&crab[3..])), "🦀");
        assert_eq!(out.finish(), "");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut out = TextOut::new(&[]);
        assert_eq!(text(out.push(b"a\xffb")), "a\u{fffd}b");
        assert_eq!(text(out.push(&"ü".as_bytes()[..1])), "");
        assert_eq!(out.finish(), "\u{fffd}");
    }

    #[test]
    fn stop_strings_spanning_tokens_are_found_and_cut() {
        let mut out = TextOut::new(&["END".to_string()]);
        assert_eq!(text(out.push(b"one E")), "one ");
        assert_eq!(text(out.push(b"N")), "");
        assert_eq!(out.push(b"D and more"), Step::Stop(String::new()));

        let mut out = TextOut::new(&["\n\n".to_string(), "xyz".to_string()]);
        assert_eq!(text(out.push(b"a\n")), "a");
        assert_eq!(out.push(b"\nb"), Step::Stop(String::new()));

        let mut out = TextOut::new(&["stop".to_string()]);
        assert_eq!(out.push(b"go stop now"), Step::Stop("go ".into()));

        // Bytes of a character after the stop string do not come back at the end.
        let mut out = TextOut::new(&["stop".to_string()]);
        let e = "é".as_bytes();
        assert_eq!(
            out.push(&[b"a stop ".as_slice(), &e[..1]].concat()),
            Step::Stop("a ".into())
        );
        assert_eq!(out.finish(), "");
    }

    #[test]
    fn a_false_start_of_a_stop_string_is_released() {
        let mut out = TextOut::new(&["END".to_string()]);
        assert_eq!(text(out.push(b"EN")), "");
        assert_eq!(text(out.push(b"ough")), "ENough");
        assert_eq!(text(out.push(b" E")), " ");
        assert_eq!(out.finish(), "E");
    }

    #[test]
    fn the_stop_that_matched_is_named_by_its_place_in_the_request() {
        let mut t = TextOut::new(&["".into(), "zz".into(), "END".into()]);
        assert_eq!(t.stop_reason(), crate::request::FinishReason::Stop);
        assert_eq!(text(t.push(b"abc EN")), "abc ");
        assert_eq!(t.matched_stop(), None);
        assert!(matches!(t.push(b"D more"), Step::Stop(s) if s.is_empty()));
        assert_eq!(t.matched_stop(), Some(2));
        assert_eq!(
            t.stop_reason(),
            crate::request::FinishReason::StopSequence(2)
        );
    }
}
