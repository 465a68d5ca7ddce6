//! The answer cache: exact-match reuse of whole answers to repeated deterministic requests.
//!
//! The key is a SHA-256 of everything that decides the output: the served model, the task profile,
//! the prompt (messages), sampling, output constraint and tools. Only requests whose output depends
//! on nothing else are stored: greedy (`temperature` 0) or seeded ones; sampled requests are served
//! from the cache only when configured (`sampled = true`). Entries are bounded in total bytes
//! (least recently used go first, the `lru` crate's list: every operation O(1)) and expire after
//! a TTL (checked when an entry is looked up; an expired one that nobody asks for again leaves by
//! the byte bound). A stored answer keeps its text chunks as generated, so a streaming request
//! replays the same chunks.
//!
//! Pure data structure: time is passed in, nothing here does I/O.

use std::time::{Duration, Instant};

use lru::LruCache;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use tidepool_engine::request::{FinishReason, GenerationRequest, ToolCall, Usage};

/// The `[cache]` table of the configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Whether answers are cached at all.
    pub enabled: bool,
    /// The most bytes of answers (and keys) kept, MiB.
    pub max_mib: f64,
    /// Seconds an answer stays valid.
    pub ttl_s: f64,
    /// Also cache sampled requests (temperature above 0 and no seed): a repeat then gets the same
    /// answer instead of a fresh sample.
    pub sampled: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            max_mib: 64.0,
            ttl_s: 600.0,
            sampled: false,
        }
    }
}

impl CacheConfig {
    /// Semantic checks; the error names the key.
    pub fn validate(&self) -> Result<(), tidepool_bounds::Invalid> {
        tidepool_bounds::float("cache.max_mib", self.max_mib, 0.0, 1024.0 * 1024.0)?;
        tidepool_bounds::seconds("cache.ttl_s", self.ttl_s, true)
    }
}

/// Identifies one request's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// The key of `request` for `model` under `profile` (empty for none).
    pub fn of(model: &str, profile: &str, request: &GenerationRequest) -> CacheKey {
        let mut h = Sha256::new();
        for part in [model, profile] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        // Serializing the request covers messages, sampling, constraint and tools; serde_json
        // writes the same bytes for the same values.
        h.update(serde_json::to_vec(request).expect("requests serialize"));
        CacheKey(h.finalize().into())
    }
}

/// One stored answer: what a generation streamed, and how it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedAnswer {
    /// Text chunks in the order they were generated.
    pub chunks: Vec<String>,
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    /// How the prompt was truncated to fit the context, reported again on every replay.
    pub truncation: Option<crate::context_fit::Truncation>,
}

impl CachedAnswer {
    /// Bytes the entry accounts for (text, tool calls and a fixed overhead).
    pub fn bytes(&self) -> usize {
        let text: usize = self.chunks.iter().map(|c| c.len() + 24).sum();
        let calls: usize = self
            .tool_calls
            .iter()
            .map(|c| c.id.len() + c.name.len() + c.arguments.len() + 72)
            .sum();
        text + calls + 160
    }
}

struct Entry {
    answer: CachedAnswer,
    bytes: usize,
    stored: Instant,
}

/// Counters for /metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub inserts: u64,
    pub evictions: u64,
    pub expired: u64,
    pub entries: usize,
    pub bytes: usize,
}

impl CacheStats {
    /// Hits over lookups, 0 before any.
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }
}

/// The cache: a byte-bounded LRU map with a TTL.
pub struct AnswerCache {
    max_bytes: usize,
    ttl: Duration,
    entries: LruCache<CacheKey, Entry>,
    stats: CacheStats,
}

impl AnswerCache {
    pub fn new(max_bytes: usize, ttl: Duration) -> AnswerCache {
        AnswerCache {
            max_bytes,
            ttl,
            entries: LruCache::unbounded(),
            stats: CacheStats::default(),
        }
    }

    pub fn from_config(cfg: &CacheConfig) -> AnswerCache {
        AnswerCache::new(
            (cfg.max_mib * 1024.0 * 1024.0) as usize,
            tidepool_bounds::duration(cfg.ttl_s),
        )
    }

    /// The answer stored under `key` and still fresh at `now`; counts a hit or a miss.
    pub fn get(&mut self, key: &CacheKey, now: Instant) -> Option<CachedAnswer> {
        let ttl = self.ttl;
        let fresh = match self.entries.get(key) {
            // `get` also makes it the most recently used.
            Some(e) if now.saturating_duration_since(e.stored) < ttl => Some(e.answer.clone()),
            Some(_) => None,
            None => {
                self.stats.misses += 1;
                return None;
            }
        };
        match fresh {
            Some(a) => {
                self.stats.hits += 1;
                Some(a)
            }
            None => {
                if let Some(e) = self.entries.pop(key) {
                    self.stats.bytes -= e.bytes;
                }
                self.stats.expired += 1;
                self.stats.misses += 1;
                None
            }
        }
    }

    /// Stores `answer` under `key` at `now`, evicting the least recently used entries to stay
    /// within the byte bound. An answer larger than the whole bound is not stored.
    pub fn insert(&mut self, key: CacheKey, answer: CachedAnswer, now: Instant) -> bool {
        let bytes = answer.bytes();
        if bytes > self.max_bytes {
            return false;
        }
        if let Some(old) = self.entries.pop(&key) {
            self.stats.bytes -= old.bytes;
        }
        while self.stats.bytes + bytes > self.max_bytes {
            let Some((_, e)) = self.entries.pop_lru() else {
                break;
            };
            self.stats.bytes -= e.bytes;
            if now.saturating_duration_since(e.stored) < self.ttl {
                self.stats.evictions += 1;
            } else {
                self.stats.expired += 1;
            }
        }
        self.entries.put(
            key,
            Entry {
                answer,
                bytes,
                stored: now,
            },
        );
        self.stats.bytes += bytes;
        self.stats.inserts += 1;
        true
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.entries.len(),
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_engine::request::{ChatMessage, Role};

    fn answer(text: &str) -> CachedAnswer {
        CachedAnswer {
            chunks: vec![text.to_string()],
            tool_calls: Vec::new(),
            finish_reason: FinishReason::Stop,
            usage: Usage::default(),
            truncation: None,
        }
    }

    fn key(i: u8) -> CacheKey {
        CacheKey([i; 32])
    }

    #[test]
    fn keys_depend_on_everything_that_decides_the_output() {
        let mut r = GenerationRequest::chat(vec![ChatMessage::new(Role::User, "hi")]);
        r.sampling.temperature = Some(0.0);
        let k = CacheKey::of("m", "", &r);
        assert_eq!(k, CacheKey::of("m", "", &r.clone()));
        assert_ne!(k, CacheKey::of("other", "", &r));
        assert_ne!(k, CacheKey::of("m", "sentiment", &r));
        let mut r2 = r.clone();
        r2.sampling.max_tokens = Some(5);
        assert_ne!(k, CacheKey::of("m", "", &r2));
        let mut r3 = r.clone();
        r3.prompt =
            tidepool_engine::request::Prompt::Chat(vec![ChatMessage::new(Role::User, "hi!")]);
        assert_ne!(k, CacheKey::of("m", "", &r3));
        // Field boundaries are unambiguous.
        assert_ne!(CacheKey::of("ab", "c", &r), CacheKey::of("a", "bc", &r));
    }

    #[test]
    fn hit_miss_and_ttl() {
        let t0 = Instant::now();
        let mut c = AnswerCache::new(1 << 20, Duration::from_secs(10));
        assert_eq!(c.get(&key(1), t0), None);
        assert!(c.insert(key(1), answer("hello"), t0));
        assert_eq!(
            c.get(&key(1), t0 + Duration::from_secs(9)),
            Some(answer("hello"))
        );
        assert_eq!(c.get(&key(1), t0 + Duration::from_secs(10)), None);
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.expired, s.entries), (1, 2, 1, 0));
        assert_eq!(s.bytes, 0);
        assert!((s.hit_rate() - 1.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn byte_bound_evicts_least_recently_used() {
        let t = Instant::now();
        let one = answer("x").bytes();
        let mut c = AnswerCache::new(one * 2, Duration::from_secs(60));
        c.insert(key(1), answer("x"), t);
        c.insert(key(2), answer("y"), t);
        // Using 1 makes 2 the least recently used.
        assert!(c.get(&key(1), t).is_some());
        c.insert(key(3), answer("z"), t);
        assert!(c.get(&key(2), t).is_none());
        assert!(c.get(&key(1), t).is_some());
        assert!(c.get(&key(3), t).is_some());
        let s = c.stats();
        assert_eq!((s.entries, s.evictions), (2, 1));
        assert!(s.bytes <= one * 2);
        // Larger than the whole bound: refused, nothing evicted.
        assert!(!c.insert(key(4), answer(&"w".repeat(one * 3)), t));
        assert_eq!(c.stats().entries, 2);
    }

    #[test]
    fn replacing_a_key_keeps_the_byte_count_exact() {
        let t = Instant::now();
        let mut c = AnswerCache::new(1 << 20, Duration::from_secs(60));
        c.insert(key(1), answer("short"), t);
        c.insert(key(1), answer("a longer answer"), t);
        assert_eq!(c.stats().bytes, answer("a longer answer").bytes());
        assert_eq!(c.stats().entries, 1);
    }
}
