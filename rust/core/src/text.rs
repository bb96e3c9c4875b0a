//! Turning a stream of token bytes into text pieces: whole UTF-8 characters only, and never the text of a
//! stop string (or of its beginning, until it is known not to be one).

/// Assembles token bytes into UTF-8 text, holding back an incomplete multi-byte character until the token
/// that completes it arrives. Bytes that can never form a character become U+FFFD.
#[derive(Debug, Default)]
pub(crate) struct Utf8Assembler {
    pending: Vec<u8>,
}

impl Utf8Assembler {
    /// Adds bytes and returns the text that is now complete.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    out.push_str(text);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(
                        std::str::from_utf8(&self.pending[..valid]).expect("validated prefix"),
                    );
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Ends the stream: an incomplete character left over becomes U+FFFD.
    pub(crate) fn finish(&mut self) -> String {
        if self.pending.is_empty() {
            String::new()
        } else {
            self.pending.clear();
            char::REPLACEMENT_CHARACTER.to_string()
        }
    }
}

/// Watches generated text for stop strings. Text is released only once it cannot be the start of a stop
/// string; the stop string itself is never released.
#[derive(Debug)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What [`StopMatcher::push`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StopScan {
    /// No stop string yet; this text is safe to release.
    Continue(String),
    /// A stop string was found; this is the text before it.
    Stopped(String),
}

impl StopMatcher {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub(crate) fn push(&mut self, text: &str) -> StopScan {
        self.held.push_str(text);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            let before = self.held[..at].to_owned();
            self.held.clear();
            return StopScan::Stopped(before);
        }
        // Keep the longest tail of the text that is a proper prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.held, s))
            .max()
            .unwrap_or(0);
        let release_to = self.held.len() - keep;
        let released = self.held[..release_to].to_owned();
        self.held.drain(..release_to);
        StopScan::Continue(released)
    }

    /// Ends the stream: held text was not a stop string after all.
    pub(crate) fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`, on character boundaries.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| {
            let start = text.len() - n;
            text.is_char_boundary(start) && stop.as_bytes().starts_with(&text.as_bytes()[start..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multibyte_characters_split_across_tokens_are_never_broken() {
        let mut a = Utf8Assembler::default();
        let snowman = "☃".as_bytes();
        assert_eq!(a.push(&snowman[..1]), "");
        assert_eq!(a.push(&snowman[1..2]), "");
        assert_eq!(a.push(&[snowman[2], b'!']), "☃!");
        assert_eq!(a.finish(), "");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut a = Utf8Assembler::default();
        assert_eq!(a.push(&[b'a', 0xff, b'b']), "a\u{fffd}b");
        assert_eq!(a.push(&[0xe2, 0x98]), "");
        assert_eq!(a.finish(), "\u{fffd}");
    }

    #[test]
    fn stop_strings_are_held_back_and_never_released() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("abc E"), StopScan::Continue("abc ".into()));
        assert_eq!(m.push("N"), StopScan::Continue(String::new()));
        assert_eq!(m.push("Dx"), StopScan::Stopped(String::new()));
    }

    #[test]
    fn a_false_start_is_released() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("EN"), StopScan::Continue(String::new()));
        assert_eq!(m.push("X"), StopScan::Continue("ENX".into()));
        assert_eq!(m.push("EN"), StopScan::Continue(String::new()));
        assert_eq!(m.finish(), "EN");
    }

    #[test]
    fn the_earliest_stop_string_wins() {
        let mut m = StopMatcher::new(vec!["world".into(), "lo".into()]);
        assert_eq!(m.push("hello world"), StopScan::Stopped("hel".into()));
    }
}
