//! `hf://OWNER/REPO[@REVISION]/PATH/IN/REPO` weight references, resolved through the Hugging Face
//! hub cache first (so a file fetched once works offline) and the hub API otherwise.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use hf_hub::{Cache, Repo, RepoType};

/// A parsed `hf://` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    pub repo: String,
    pub revision: String,
    pub file: String,
}

impl HubRef {
    /// Parses `hf://OWNER/REPO[@REV]/FILE`; returns `None` for anything not starting with `hf://`.
    pub fn parse(spec: &str) -> Option<Result<Self>> {
        let rest = spec.strip_prefix("hf://")?;
        let parts: Vec<&str> = rest.splitn(3, '/').collect();
        if parts.len() < 3 || parts.iter().any(|p| p.is_empty()) {
            return Some(Err(anyhow::anyhow!("{spec}: expected hf://OWNER/REPO[@REVISION]/FILE")));
        }
        let (name, revision) = match parts[1].split_once('@') {
            Some((name, rev)) => (name, rev.to_string()),
            None => (parts[1], "main".to_string()),
        };
        Some(Ok(Self { repo: format!("{}/{name}", parts[0]), revision, file: parts[2].to_string() }))
    }

    fn hf_repo(&self) -> Repo {
        Repo::with_revision(self.repo.clone(), RepoType::Model, self.revision.clone())
    }
}

/// Turns a weights spec into a local path: plain paths must exist, `hf://` ones are looked up in the
/// hub cache (`HF_HOME`) and downloaded only when missing there.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    let Some(hub) = HubRef::parse(spec) else {
        let path = PathBuf::from(spec);
        if !path.is_file() {
            bail!("weights file {spec} does not exist");
        }
        return Ok(path);
    };
    let hub = hub?;
    if let Some(path) = Cache::from_env().repo(hub.hf_repo()).get(&hub.file) {
        return Ok(path);
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .build()
        .with_context(|| format!("{spec}: cannot set up the Hugging Face hub client"))?;
    api.repo(hub.hf_repo())
        .get(&hub.file)
        .with_context(|| format!("{spec}: not in the hub cache and the download failed (offline?)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hub_references() {
        let r = HubRef::parse("hf://madry/robust-resnets@v1/cifar/l2.safetensors").unwrap().unwrap();
        assert_eq!(r.repo, "madry/robust-resnets");
        assert_eq!(r.revision, "v1");
        assert_eq!(r.file, "cifar/l2.safetensors");
        assert_eq!(HubRef::parse("hf://a/b/c").unwrap().unwrap().revision, "main");
        assert!(HubRef::parse("hf://a/b").unwrap().is_err());
        assert!(HubRef::parse("local.safetensors").is_none());
        assert!(resolve("/nonexistent/w.safetensors").unwrap_err().to_string().contains("does not exist"));
    }

    #[test]
    fn cached_files_resolve_offline() {
        // Lay out a hub cache by hand, as hf-hub leaves it after a download.
        let home = tempfile::tempdir().unwrap();
        let repo = home.path().join("hub/models--owner--name");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123").unwrap();
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::write(repo.join("snapshots/abc123/w.safetensors"), b"x").unwrap();
        let cache = Cache::new(home.path().join("hub"));
        let hub = HubRef::parse("hf://owner/name/w.safetensors").unwrap().unwrap();
        assert_eq!(cache.repo(hub.hf_repo()).get(&hub.file), Some(repo.join("snapshots/abc123/w.safetensors")));
    }
}
