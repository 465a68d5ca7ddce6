//! Tidepool's configuration file (`tidepool serve --config FILE`): one schema for the headless
//! server and the tray app, validated in one place, with errors that point at the line.

use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use tidepool_bounds::Invalid;

/// The default port: clashes with none of Ollama (11434), LM Studio (1234), llama.cpp (8080),
/// vLLM (8000). 8433 spells TIDE on a phone keypad.
pub const DEFAULT_PORT: u16 = 8433;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: invalid `{key}`: {message}")]
    Invalid {
        path: String,
        key: String,
        message: String,
    },
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub model: ModelConfig,
    pub pool: PoolConfig,
    pub policy: tidepool_control::policy::PolicyConfig,
    pub power: tidepool_control::power::PowerConfig,
    /// The answer cache.
    pub cache: tidepool_gateway::answer_cache::CacheConfig,
    /// Long inputs: the context budget and what happens past it.
    pub context: tidepool_gateway::context_fit::ContextConfig,
    /// Short answers under backlog.
    pub degraded: tidepool_gateway::degrade::DegradedConfig,
    /// Task profiles by name (`[profiles.NAME]`), added to the built-in ones.
    pub profiles: tidepool_gateway::profile::Profiles,
}

/// The worker pool's memory budget, reservations and queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Share of the memory available at start that workers may reserve.
    pub memory_fraction: f64,
    /// An absolute cap on what workers reserve, MiB; unset means only the fraction applies.
    pub memory_cap_mib: Option<u64>,
    /// Tokens of context reserved per slot for the KV cache, at most: the longest request
    /// (prompt and answer) a worker holds.
    pub context_tokens: u64,
    /// The least context a worker's slots get: between this and `context_tokens`, a new worker
    /// gets what recent requests needed (a power of two), so short requests do not reserve the
    /// KV cache of long ones. Equal to `context_tokens`: every worker gets all of it.
    pub min_context_tokens: u64,
    /// Runtime memory per worker beyond weights and KV cache, MiB.
    pub overhead_mib: u64,
    /// Requests that may wait for a slot; more get 429.
    pub queue_capacity: usize,
    /// Seconds a request may wait for a slot.
    pub queue_deadline_s: f64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            memory_fraction: 0.6,
            memory_cap_mib: None,
            context_tokens: 4096,
            min_context_tokens: 512,
            overhead_mib: 160,
            queue_capacity: 64,
            queue_deadline_s: 30.0,
        }
    }
}

/// The shortest LAN token accepted from a config or the environment (generated ones are 64 hex
/// characters, 256 bits).
pub const MIN_TOKEN_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Largest accepted request body, in MiB.
    pub body_limit_mib: usize,
    /// Seconds shutdown waits for running requests.
    pub drain_timeout_s: u64,
    /// Also listen on this machine's LAN addresses (every non-loopback request then needs the
    /// token). Off by default.
    pub share_lan: bool,
    /// The bearer token LAN peers must send; unset with `share_lan` generates one at start.
    /// `TIDEPOOL_LAN_TOKEN` overrides it.
    pub lan_token: Option<String>,
    /// Requests per minute one LAN address may make (429 with Retry-After beyond); failed
    /// authentication counts too, and repeated failures back off.
    pub lan_rate_per_minute: u32,
    /// Host names beyond localhost, 127.0.0.1 and [::1] that requests from this machine may use
    /// (for a reverse proxy of your own); any other `Host` is refused (DNS rebinding).
    pub allowed_hosts: Vec<String>,
    /// Web origins (besides the dashboard's own) whose pages may call the OpenAI and Ollama APIs
    /// from a browser, as `OLLAMA_ORIGINS` does: exact (`https://app.example`) or with a trailing
    /// `*` (`chrome-extension://*`). `TIDEPOOL_ORIGINS` (comma-separated) adds to it. The admin
    /// API never answers another origin.
    pub allowed_origins: Vec<String>,
    /// Seconds a client has to send a request's headers (also how long an idle connection
    /// stays open).
    pub header_timeout_s: u64,
    /// Seconds a client may go without reading a response before it is cut off (its generation
    /// is cancelled and its slot freed).
    pub write_timeout_s: u64,
    /// Open connections from this machine.
    pub max_connections: usize,
    /// Open connections from the LAN, and from one LAN address.
    pub max_lan_connections: usize,
    pub max_connections_per_lan_address: usize,
    /// Messages one chat request may carry (more: 400).
    pub max_messages: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: DEFAULT_PORT,
            body_limit_mib: 4,
            drain_timeout_s: 60,
            share_lan: false,
            lan_token: None,
            lan_rate_per_minute: 100,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            header_timeout_s: 10,
            write_timeout_s: 30,
            max_connections: 512,
            max_lan_connections: 256,
            max_connections_per_lan_address: 32,
            max_messages: tidepool_engine::request::DEFAULT_MAX_MESSAGES,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceSetting {
    #[default]
    Auto,
    Cpu,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Catalog id or path to a `.gguf`; unset means the catalog default.
    pub id: Option<String>,
    pub device: DeviceSetting,
    /// Concurrent sequences per worker; unset means [`ModelConfig::default_slots`] for the device
    /// and engine.
    pub slots: Option<usize>,
    /// Prompt prefixes kept for reuse (mistral.rs prefix cache); 0 disables it. Unset: 16 on a
    /// GPU, off on the CPU, where mistral.rs 0.8.1 never evicts cached prefixes (RSS grew from
    /// 131 MB to 1.43 GB in 120 s of load with 16; flat with 0).
    pub prefix_cache: Option<usize>,
    /// CPU threads per llama.cpp worker; unset: every core the CPU limit allows.
    pub threads: Option<usize>,
    /// The inference library: `auto` (the default: mistral.rs on a GPU, the faster one measured
    /// on the CPU), `mistralrs` or `llamacpp`. See [`tidepool_engine::choice`].
    pub engine: tidepool_engine::choice::EngineSetting,
    /// How `/v1/embeddings` and `/api/embed` pool a sequence's token vectors: `mean`, `cls` or
    /// `last`; unset: what the GGUF declares (`{arch}.pooling_type`), else `mean`.
    pub pooling: Option<tidepool_engine::embed::Pooling>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            id: None,
            device: DeviceSetting::Auto,
            slots: None,
            threads: None,
            prefix_cache: None,
            engine: tidepool_engine::choice::EngineSetting::Auto,
            pooling: None,
        }
    }
}

impl ModelConfig {
    /// Slots per worker when the config leaves them unset. On a GPU batching is where
    /// throughput comes from, and 8 concurrent sequences were measured to run well with
    /// mistral.rs on an H100 (32 did not). On the CPU, mistral.rs gains nothing from sequences
    /// batched in one engine (candle's quantized matmul costs a batch what its sequences cost
    /// alone; `scripts/bench-shapes.sh`: 1x1 34.2 tok/s, 1x4 34.8) and they lengthen every
    /// latency (docs/elasticity.md, the ramp: 1x1 p95 1.59 s, 1x2 10.98 s), so its unit is one
    /// slot and the pool grows in workers; a llama.cpp context batches its sequences in one
    /// decode and two workers of 2 slots served as much as one of 4, so it gets 2.
    pub fn default_slots(gpu: bool, engine: tidepool_engine::choice::EngineKind) -> usize {
        match (gpu, engine) {
            (true, _) => 8,
            (false, tidepool_engine::choice::EngineKind::MistralRs) => 1,
            (false, _) => 2,
        }
    }

    /// Prefix-cache entries for a worker on a GPU (`gpu`) or the CPU.
    pub fn prefix_cache_for(&self, gpu: bool) -> usize {
        self.prefix_cache.unwrap_or(if gpu { 16 } else { 0 })
    }

    /// The slots per worker for a worker of `engine` on a GPU (`gpu`) or the CPU.
    pub fn slots_for(&self, gpu: bool, engine: tidepool_engine::choice::EngineKind) -> usize {
        self.slots
            .unwrap_or_else(|| Self::default_slots(gpu, engine))
    }
}

impl Config {
    /// The settings of the request gateway: answer cache, context budget (default: the pool's
    /// `context_tokens`), degraded mode and task profiles.
    pub fn gateway(&self) -> tidepool_gateway::gateway::GatewayConfig {
        tidepool_gateway::gateway::GatewayConfig {
            cache: self.cache.clone(),
            context: tidepool_gateway::context_fit::ContextConfig {
                budget_tokens: Some(
                    self.context
                        .budget_tokens
                        .unwrap_or(self.pool.context_tokens.min(u32::MAX as u64) as u32),
                ),
                ..self.context.clone()
            },
            degraded: self.degraded.clone(),
            profiles: self.profiles.clone(),
            max_messages: self.server.max_messages,
        }
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let cfg = Config::parse(&text, &path.display().to_string())?;
        if let Some(w) = cfg.secret_warning(path) {
            tracing::warn!("{w}");
        }
        Ok(cfg)
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        self.check().map_err(|(key, message)| ConfigError::Invalid {
            path: origin.to_string(),
            key,
            message,
        })
    }

    /// Every range and rule of the file; the first error names its key.
    fn check(&self) -> Result<(), Invalid> {
        use tidepool_bounds::{float_above, int};
        let s = &self.server;
        if s.host.trim().is_empty() {
            return Err(("server.host".into(), "must not be empty".into()));
        }
        if let Some(t) = &s.lan_token {
            if t.len() < MIN_TOKEN_LEN
                || t.len() > 1024
                || t.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err((
                    "server.lan_token".into(),
                    format!(
                        "must be {MIN_TOKEN_LEN} to 1024 characters with no spaces (a random one is generated when unset)"
                    ),
                ));
            }
        }
        int(
            "server.lan_rate_per_minute",
            s.lan_rate_per_minute.into(),
            1,
            1_000_000,
        )?;
        int("server.body_limit_mib", s.body_limit_mib as u64, 1, 1024)?;
        int("server.drain_timeout_s", s.drain_timeout_s, 0, 3600)?;
        int("server.header_timeout_s", s.header_timeout_s, 1, 600)?;
        int("server.write_timeout_s", s.write_timeout_s, 1, 3600)?;
        int(
            "server.max_connections",
            s.max_connections as u64,
            1,
            65_536,
        )?;
        int(
            "server.max_lan_connections",
            s.max_lan_connections as u64,
            1,
            65_536,
        )?;
        int(
            "server.max_connections_per_lan_address",
            s.max_connections_per_lan_address as u64,
            1,
            65_536,
        )?;
        int("server.max_messages", s.max_messages as u64, 1, 1_000_000)?;
        for (i, h) in s.allowed_hosts.iter().enumerate() {
            if h.is_empty() || h.contains([':', '/', ' ']) || h.len() > 253 {
                return Err((
                    format!("server.allowed_hosts[{i}]"),
                    "must be a host name without a port or scheme".into(),
                ));
            }
        }
        for (i, o) in s.allowed_origins.iter().enumerate() {
            if !o.contains("://") || o.contains(' ') || o.len() > 512 {
                return Err((
                    format!("server.allowed_origins[{i}]"),
                    "must be an origin such as https://app.example (a trailing * matches any rest)"
                        .into(),
                ));
            }
        }
        let p = &self.pool;
        if !(p.memory_fraction > 0.0 && p.memory_fraction <= 1.0) {
            return Err((
                "pool.memory_fraction".into(),
                format!("must be in (0, 1], got {}", p.memory_fraction),
            ));
        }
        if let Some(cap) = p.memory_cap_mib {
            int("pool.memory_cap_mib", cap, 1, 1 << 30)?;
        }
        int("pool.context_tokens", p.context_tokens, 16, 1 << 20)?;
        int(
            "pool.min_context_tokens",
            p.min_context_tokens,
            16,
            p.context_tokens,
        )?;
        int("pool.overhead_mib", p.overhead_mib, 0, 1 << 20)?;
        int("pool.queue_capacity", p.queue_capacity as u64, 1, 1 << 20)?;
        float_above("pool.queue_deadline_s", p.queue_deadline_s, 0.0, 86_400.0)?;
        for (setting, kind) in [
            (
                tidepool_engine::choice::EngineSetting::LlamaCpp,
                tidepool_engine::choice::EngineKind::LlamaCpp,
            ),
            (
                tidepool_engine::choice::EngineSetting::MistralRs,
                tidepool_engine::choice::EngineKind::MistralRs,
            ),
        ] {
            if self.model.engine == setting && !kind.built() {
                return Err((
                    "model.engine".into(),
                    format!(
                        "{} is not in this build (it was built without the `{}` feature)",
                        kind.name(),
                        kind.name()
                    ),
                ));
            }
        }
        if let Some(slots) = self.model.slots {
            int("model.slots", slots as u64, 1, 256)?;
        }
        if let Some(n) = self.model.threads {
            int("model.threads", n as u64, 1, 1024)?;
        }
        if let Some(n) = self.model.prefix_cache {
            int("model.prefix_cache", n as u64, 0, 1024)?;
        }
        self.policy.validate()?;
        self.power.validate()?;
        self.cache.validate()?;
        self.context.validate()?;
        self.degraded.validate()?;
        tidepool_gateway::profile::validate(&tidepool_gateway::profile::resolve(&self.profiles))?;
        Ok(())
    }

    /// A warning when this file holds the LAN token and other users can read it.
    pub fn secret_warning(&self, path: &Path) -> Option<String> {
        self.server.lan_token.as_ref()?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).ok()?.permissions().mode();
            if mode & 0o077 != 0 {
                return Some(format!(
                    "{} holds server.lan_token and is readable by other users (mode {:o}): run `chmod 600 {}`",
                    path.display(),
                    mode & 0o777,
                    path.display()
                ));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        let c = Config::parse("", "t.toml").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.server.port, DEFAULT_PORT);
        assert_eq!(c.server.host, "127.0.0.1");
    }

    #[test]
    fn errors_point_at_the_line() {
        let e = Config::parse("[server]\nport = 80\nhots = \"x\"\n", "t.toml").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("hots"), "{msg}");
        let e = Config::parse("[server]\nport = \"eighty\"\n", "t.toml").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn the_engine_is_chosen_by_name_with_line_precise_errors() {
        use tidepool_engine::choice::EngineSetting;
        let c = Config::parse("[model]\nengine = \"mistralrs\"\n", "t.toml").unwrap();
        assert_eq!(c.model.engine, EngineSetting::MistralRs);
        assert_eq!(Config::default().model.engine, EngineSetting::Auto);
        let e = Config::parse("[model]\nslots = 2\nengine = \"llama\"\n", "t.toml").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("llamacpp"), "{msg}");
        let llama = Config::parse("[model]\nengine = \"llamacpp\"\n", "t.toml");
        assert_eq!(llama.is_ok(), cfg!(feature = "llamacpp"), "{llama:?}");
    }

    #[test]
    fn the_readme_example_is_valid() {
        let readme = include_str!("../../../README.md");
        let start = readme.find("```toml\n").expect("README has a TOML example") + 8;
        let len = readme[start..].find("```").unwrap();
        let c = Config::parse(&readme[start..start + len], "README.md").unwrap();
        assert_eq!(c.policy.up.window_s, 3.0);
        assert_eq!(c.pool.queue_capacity, 64);
    }

    #[test]
    fn the_documented_configuration_is_valid() {
        // docs/configuration.md lists every key with its default: the file must parse, and with
        // its commented-out keys switched on too.
        let doc = include_str!("../../../docs/configuration.md");
        let start = doc.find("```toml\n").expect("a TOML block") + 8;
        let len = doc[start..].find("```").unwrap();
        let block = &doc[start..start + len];
        Config::parse(block, "docs/configuration.md").unwrap();
        let uncommented: String = block
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if rest.starts_with('[') || rest.contains(" = ") => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let c = Config::parse(&uncommented, "docs/configuration.md").unwrap();
        assert!(c.model.threads.is_some());
    }

    #[test]
    fn gateway_sections_are_validated() {
        let e = Config::parse("[cache]\nttl_s = 0\n", "t.toml").unwrap_err();
        assert!(e.to_string().contains("cache.ttl_s"), "{e}");
        let e = Config::parse("[context]\non_overflow = \"drop\"\n", "t.toml").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        let e = Config::parse("[degraded]\nbacklog_threshold = 0\n", "t.toml").unwrap_err();
        assert!(e.to_string().contains("degraded.backlog_threshold"), "{e}");
        let e = Config::parse(
            "[profiles.both]\ncombine = [\"chat\", \"sentiment\"]\n",
            "t.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("profiles.both.combine"), "{e}");
        let e = Config::parse("[profiles.x]\nlabel = [\"a\"]\n", "t.toml").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        let c = Config::parse(
            "[pool]\ncontext_tokens = 2048\n[context]\non_overflow = \"truncate\"\n[profiles.yn]\nlabels = [\"yes\", \"no\"]\n",
            "t.toml",
        )
        .unwrap();
        let g = c.gateway();
        assert_eq!(g.context.budget_tokens, Some(2048));
        assert_eq!(g.profiles["yn"].labels, ["yes", "no"]);
    }

    #[test]
    fn semantic_validation() {
        let e = Config::parse("[model]\nslots = 0\n", "t.toml").unwrap_err();
        assert!(e.to_string().contains("model.slots"), "{e}");
        let e = Config::parse("[policy]\nmin_workers = 9\n", "t.toml").unwrap_err();
        assert!(e.to_string().contains("policy.min_workers"), "{e}");
        let e = Config::parse("[pool]\nmemory_fraction = 1.5\n", "t.toml").unwrap_err();
        assert!(e.to_string().contains("pool.memory_fraction"), "{e}");
        let c = Config::parse(
            "[policy]\nmax_workers = 3\n[[policy.schedule]]\nstart = \"07:50\"\nend = \"09:00\"\nmin_workers = 2\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.policy.schedule[0].min_workers, 2);
        let e = Config::parse("[policy.up]\nwindow = 3\n", "t.toml").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }
}
