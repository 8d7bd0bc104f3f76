//! `bigroc stats` / `bigroc eval` end to end through the binary.

use std::path::Path;
use std::process::Command;

use bigroc::eval::precision_recall::precision_recall;
use bigroc::eval::stats_file::write_stats;
use bigroc::eval::FeatureSet;
use candle_core::{Device, Tensor};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn bigroc() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bigroc"));
    c.current_dir(ROOT).env_remove("BIGROC_INCEPTION");
    c
}

fn feature_set(key: &str) -> FeatureSet {
    let fx = candle_core::safetensors::load(
        Path::new(ROOT).join("tests/fixtures/eval_fid.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let f: &Tensor = &fx[key];
    let f = f.pad_with_zeros(1, 0, 2048 - f.dim(1).unwrap()).unwrap();
    FeatureSet {
        pool: f.flatten_all().unwrap().to_vec1().unwrap(),
        count: f.dim(0).unwrap(),
        ..Default::default()
    }
}

/// Two cached statistics files: no network needed; the numbers are the library's; IS is refused
/// with a note because the files have no logits; the JSON has every field.
#[test]
fn eval_two_stats_files() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        feature_set("full_rank.features1"),
        feature_set("full_rank.features2"),
    );
    let (pa, pb) = (dir.path().join("a.npz"), dir.path().join("b.npz"));
    write_stats(&pa, &a.stats().unwrap(), &a).unwrap();
    write_stats(&pb, &b.stats().unwrap(), &b).unwrap();
    let json = dir.path().join("out.json");
    let out = bigroc()
        .args(["eval", "--samples"])
        .arg(&pa)
        .arg("--reference")
        .arg(&pb)
        .arg("--json")
        .arg(&json)
        .args(["--inception", "/nonexistent/never-loaded.pt"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // Zero-padding the features to 2048-d leaves the FID unchanged: compare with pytorch-fid's value
    // for the unpadded features (no second 2048-d eigen solve here).
    let fx = candle_core::safetensors::load(
        Path::new(ROOT).join("tests/fixtures/eval_fid.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let fid = fx["full_rank.fid_pytorch_fid"].to_vec1::<f64>().unwrap()[0];
    assert!(
        (v["fid"].as_f64().unwrap() - fid).abs() < 1e-3,
        "{} vs {fid}",
        v["fid"]
    );
    let pr = precision_recall(
        &b.pool_tensor(&Device::Cpu).unwrap(),
        &a.pool_tensor(&Device::Cpu).unwrap(),
        3,
        1024,
    )
    .unwrap();
    assert_eq!(v["precision"].as_f64().unwrap(), pr.precision);
    assert_eq!(v["recall"].as_f64().unwrap(), pr.recall);
    assert!(v["inception_score"].is_null());
    assert!(v["notes"][0].as_str().unwrap().contains("IS"), "{v}");
    assert!(
        stdout.contains("FID") && stdout.contains("precision"),
        "{stdout}"
    );
}

/// Bad inputs fail with one line naming the culprit.
#[test]
fn eval_errors_are_clear() {
    let out = bigroc()
        .args([
            "eval",
            "--samples",
            "/nonexistent/samples",
            "--reference",
            "Cargo.toml",
            "--inception",
            "x.pt",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/samples"), "{err}");
    let out = bigroc()
        .args([
            "eval",
            "--samples",
            "a",
            "--reference",
            "b",
            "--metrics",
            "fid,kid",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("kid"));
}

/// `bigroc stats` on a folder of five images with the shared TorchScript network, then `bigroc eval`
/// of a subset against that file (FID only).
#[test]
fn stats_then_eval_on_a_folder() {
    let inception = Path::new(ROOT).join("../shared/models/inception-2015-12-05.pt");
    if !inception.exists() {
        eprintln!("SKIPPED: {} is absent", inception.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images/sub");
    std::fs::create_dir_all(&images).unwrap();
    for (i, (w, h)) in [(32u32, 32u32), (32, 32), (32, 32), (32, 32), (40, 24)]
        .into_iter()
        .enumerate()
    {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7 + i as u32 * 50) as u8, (y * 5) as u8, 128])
        });
        img.save(images.join(format!("{i}.png"))).unwrap();
    }
    let stats = dir.path().join("ref.npz");
    let out = bigroc()
        .args(["stats", "--input"])
        .arg(dir.path().join("images"))
        .arg("--output")
        .arg(&stats)
        .arg("--inception")
        .arg(&inception)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = bigroc::eval::stats_file::read_stats(&stats).unwrap();
    assert_eq!(read.features.unwrap().count, 5);
    let out = bigroc()
        .args([
            "eval",
            "--metrics",
            "fid",
            "--samples-subset",
            "0:2",
            "--samples",
        ])
        .arg(&stats)
        .arg("--reference")
        .arg(&stats)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("FID"));

    // An OpenAI-style reference batch: images `arr_0` plus stored `mu`/`sigma`. FID must use the
    // stored statistics (here the samples' own, so FID ~ 0 although the images differ) while
    // precision/recall run the network on `arr_0`.
    let stored = bigroc::eval::stats_file::read_stats(&stats)
        .unwrap()
        .stats
        .unwrap();
    let imgs: Vec<u8> = (0..5 * 32 * 32 * 3)
        .map(|i| ((i * 37) % 251) as u8)
        .collect();
    let arr0 = Tensor::from_vec(imgs, (5, 32, 32, 3), &Device::Cpu).unwrap();
    let mu = Tensor::from_slice(&stored.mu, 2048, &Device::Cpu).unwrap();
    let sigma = Tensor::from_slice(&stored.sigma, (2048, 2048), &Device::Cpu).unwrap();
    let openai = dir.path().join("VIRTUAL_ref.npz");
    Tensor::write_npz(&[("arr_0", &arr0), ("mu", &mu), ("sigma", &sigma)], &openai).unwrap();
    let json = dir.path().join("r.json");
    let out = bigroc()
        .args(["eval", "--metrics", "fid,precision,recall", "--samples"])
        .arg(&stats)
        .arg("--reference")
        .arg(&openai)
        .arg("--json")
        .arg(&json)
        .arg("--inception")
        .arg(&inception)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(v["fid"].as_f64().unwrap().abs() < 1e-3, "{v}");
    assert_eq!(v["reference_count"].as_u64(), Some(5), "{v}");
    assert!(v["precision"].is_number() && v["recall"].is_number(), "{v}");
}
