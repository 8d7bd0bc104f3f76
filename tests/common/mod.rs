//! Shared helpers for the integration tests: fixtures made by xtask/reference/*_fixtures.py.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use bigroc::classifier::{Classifier, ClassifierInfo};
use bigroc::weights::Checkpoint;
use candle_core::{Device, Tensor};

pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures")).join(name)
}

/// A fixture's tensors and its `__metadata__["config"]` JSON.
pub fn load_fixture(name: &str) -> (HashMap<String, Tensor>, serde_json::Value) {
    let path = fixture_path(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let config = meta.metadata().as_ref().and_then(|m| m.get("config")).expect("config metadata");
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    (tensors, serde_json::from_str(config).unwrap())
}

/// The classifier stored in a ResNet fixture (`model.*` tensors, `resnet_config` metadata).
pub fn fixture_classifier(tensors: &HashMap<String, Tensor>, meta: &serde_json::Value, info: ClassifierInfo) -> Classifier {
    let config = serde_json::from_value(meta["resnet_config"].clone()).unwrap();
    let weights = tensors
        .iter()
        .filter_map(|(k, t)| k.strip_prefix("model.").map(|k| (k.to_string(), t.clone())))
        .collect();
    let ck = Checkpoint { path: PathBuf::from("fixture"), header: Classifier::header(&config, &info), tensors: weights };
    Classifier::from_checkpoint(&ck).unwrap()
}

/// max |a - b| / max |b|.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a.to_dtype(candle_core::DType::F32).unwrap() - b.to_dtype(candle_core::DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_scalar::<f32>().unwrap();
    diff / scale.max(1e-12)
}

/// Runs the `bigroc` binary of this build (logs at warn; RUST_BACKTRACE off, which would append
/// backtraces to the one-line errors the tests check).
pub fn bigroc(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_bigroc"))
        .args(args)
        .env("BIGROC_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let out = bigroc(args);
    assert!(out.status.success(), "bigroc {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail; returns its error line, checked to be the only one.
pub fn fails(args: &[&str]) -> String {
    let out = bigroc(args);
    assert!(!out.status.success(), "bigroc {args:?} should have failed");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let line = stderr.lines().last().unwrap_or_default().to_string();
    assert!(line.starts_with("error: "), "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.starts_with("error")).count(), 1, "{stderr}");
    line
}
