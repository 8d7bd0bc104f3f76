//! `bigroc refine`, `convert`, `calibrate` and `merge` end to end through the binary: outputs,
//! resuming, sharding, and one-line errors for bad input.

mod common;
use common::{fails, ok};

use std::path::{Path, PathBuf};
use std::process::Command;

use bigroc::classifier::{Classifier, ClassifierInfo, ThreatModel};
use bigroc::data::npz;
use bigroc::refine::Norm;
use candle_core::{DType, Device, Tensor};
use common::{fixture_path, load_fixture, rel_err};

const CIFAR10: [&str; 10] = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// The cifar18 fixture's network as a weights file, with CIFAR-10 class names.
fn classifier_file(dir: &Path, poison: bool) -> PathBuf {
    let (t, meta) = load_fixture("resnet_cifar18.safetensors");
    let config = serde_json::from_value(meta["resnet_config"].clone()).unwrap();
    let info = ClassifierInfo {
        classes: CIFAR10.iter().map(|s| s.to_string()).collect(),
        dataset: Some("cifar10".into()),
        image_size: Some(32),
        threat_model: Some(ThreatModel { norm: Norm::L2, eps: 0.5 }),
        ..Default::default()
    };
    let mut tensors: std::collections::HashMap<String, Tensor> =
        t.iter().filter_map(|(k, v)| k.strip_prefix("model.").map(|k| (k.to_string(), v.clone()))).collect();
    if poison {
        let w = &tensors["linear.weight"];
        tensors.insert("linear.weight".into(), (w * f64::NAN).unwrap());
    }
    let path = dir.join(if poison { "nan.safetensors" } else { "c.safetensors" });
    bigroc::weights::save(&path, &Classifier::header(&config, &info), &tensors).unwrap();
    path
}

/// `n` random 32x32 images with labels as a sample .npz.
fn sample_npz(dir: &Path, name: &str, n: usize, labels: Option<Vec<i64>>) -> PathBuf {
    let x = Tensor::rand(0f32, 1f32, (n, 3, 32, 32), &Device::Cpu).unwrap();
    let images = bigroc::data::to_u8_nhwc(&x).unwrap();
    let path = dir.join(name);
    let labels = labels.map(|l| Tensor::new(l, &Device::Cpu).unwrap());
    let mut arrays = vec![("arr_0", &images)];
    if let Some(l) = &labels {
        arrays.push(("arr_1", l));
    }
    npz::write(&path, &arrays).unwrap();
    path
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn convert_robustness_checkpoint_gives_reference_logits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cifar18.safetensors");
    let msg = ok(&[
        "convert", "--from", "robustness", s(&fixture_path("robustness_cifar18.pt")), "--arch", "resnet18",
        "--dataset", "cifar10", "--threat-model", "l2:0.5", "--output", s(&out),
    ]);
    assert!(msg.contains("wrote"), "{msg}");
    let (t, _) = load_fixture("resnet_cifar18.safetensors");
    let classifier = Classifier::load(s(&out), &Device::Cpu).unwrap();
    assert_eq!(classifier.info.classes[3], "cat");
    assert_eq!(classifier.info.threat_model, Some(ThreatModel { norm: Norm::L2, eps: 0.5 }));
    let err = rel_err(&classifier.logits(&t["input"]).unwrap(), &t["checkpoint_logits"]);
    println!("converted checkpoint logits rel err {err:.2e}");
    assert!(err <= 1e-4, "{err}");

    // The wrong architecture or dataset is named, not silently accepted.
    let line = fails(&[
        "convert", "--from", "robustness", s(&fixture_path("robustness_cifar18.pt")), "--arch", "resnet50",
        "--dataset", "cifar10", "--output", s(&dir.path().join("x.safetensors")),
    ]);
    assert!(line.contains("key `layer1.0.conv3.weight` is missing") || line.contains("layer1.0"), "{line}");
    assert!(!dir.path().join("x.safetensors").exists());
    let line = fails(&["convert", "--from", "robustness", "/nonexistent.pt", "--dataset", "cifar10", "--output", s(&out)]);
    assert!(line.contains("/nonexistent.pt"), "{line}");
}

#[test]
fn refine_npz_with_ground_truth_grid_and_summary() {
    let dir = tempfile::tempdir().unwrap();
    let c = classifier_file(dir.path(), false);
    let input = sample_npz(dir.path(), "in.npz", 5, Some(vec![0, 3, 9, 1, 3]));
    let out = dir.path().join("out.npz");
    let grid = dir.path().join("grid.png");
    let summary = dir.path().join("summary.json");
    let msg = ok(&[
        "refine", "--input", s(&input), "--output", s(&out), "--classifier", s(&c), "--eps", "1.0", "--eps-scale",
        "signed", "--batch-size", "2", "--grid", s(&grid), "--summary-json", s(&summary),
    ]);
    assert!(msg.contains("refined 5 images") && msg.contains("ground-truth"), "{msg}");
    let arrays = npz::read_all(&out).unwrap();
    assert_eq!(arrays["arr_0"].dims(), &[5, 32, 32, 3]);
    assert_eq!(arrays["arr_1"].to_vec1::<i64>().unwrap(), vec![0, 3, 9, 1, 3]);
    let before = npz::read_all(&input).unwrap()["arr_0"].to_dtype(DType::F32).unwrap();
    let after = arrays["arr_0"].to_dtype(DType::F32).unwrap();
    let change = (&after - &before).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(change >= 1.0, "refinement changed nothing");
    // L2 norm of the change per image stays within eps = 0.5 for [0,1] pixels (+ rounding).
    let per_image = ((after - before).unwrap() / 255.0).unwrap().sqr().unwrap().reshape((5, ())).unwrap().sum(1).unwrap().sqrt().unwrap();
    let max_norm = per_image.max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(max_norm <= 0.5 + 32.0 * 0.5 / 255.0, "perturbation norm {max_norm}");
    let g = image::open(&grid).unwrap();
    assert_eq!((g.width(), g.height()), (3 * 32 + 2 * 2, 5 * 32 + 4 * 2));
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert!(s["mean_target_prob_after"].as_f64().unwrap() > s["mean_target_prob_before"].as_f64().unwrap(), "{s}");
}

#[test]
fn refine_folder_mirrors_paths_and_reads_class_folders() {
    let dir = tempfile::tempdir().unwrap();
    let c = classifier_file(dir.path(), false);
    let input = dir.path().join("gen");
    for (i, class) in ["cat", "dog", "cat"].iter().enumerate() {
        std::fs::create_dir_all(input.join(class)).unwrap();
        let img = image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([(x * 8) as u8, (y * 8) as u8, (i * 80) as u8]));
        img.save(input.join(class).join(format!("{i}.jpg"))).unwrap();
    }
    let out = dir.path().join("refined");
    let msg = ok(&["refine", "--input", s(&input), "--output", s(&out), "--classifier", s(&c)]);
    assert!(msg.contains("refined 3 images") && msg.contains("ground-truth"), "{msg}");
    for rel in ["cat/0.png", "dog/1.png", "cat/2.png"] {
        let img = image::open(out.join(rel)).unwrap();
        assert_eq!((img.width(), img.height()), (32, 32), "{rel}");
    }
    assert!(!dir.path().join("refined.partial").exists());
}

#[test]
fn interrupted_refine_resumes_to_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    let c = classifier_file(dir.path(), false);
    let input = sample_npz(dir.path(), "in.npz", 120, None);
    let whole = dir.path().join("whole.npz");
    ok(&["refine", "--input", s(&input), "--output", s(&whole), "--classifier", s(&c), "--batch-size", "1"]);

    let out = dir.path().join("out.npz");
    let partial = dir.path().join("out.npz.partial");
    let mut child = Command::new(env!("CARGO_BIN_EXE_bigroc"))
        .args(["refine", "--input", s(&input), "--output", s(&out), "--classifier", s(&c), "--batch-size", "1"])
        .env("BIGROC_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !partial.join("chunk-000002.npz").exists() {
        assert!(std::time::Instant::now() < deadline, "the run never got going");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be interrupted");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.exists(), "no final output after an interruption");
    let done = std::fs::read_dir(&partial).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("chunk-")).count();
    assert!((3..120).contains(&done), "{done} chunks done before the kill");

    // Other arguments must not mix with the interrupted run.
    let line = fails(&["refine", "--input", s(&input), "--output", s(&out), "--classifier", s(&c), "--batch-size", "1", "--eps", "0.25"]);
    assert!(line.contains("other arguments") && line.contains("settings"), "{line}");

    let msg = ok(&["refine", "--input", s(&input), "--output", s(&out), "--classifier", s(&c), "--batch-size", "1"]);
    assert!(msg.contains("refined 120 images") && !msg.contains("(120 in this run)"), "{msg}");
    let a = npz::read_all(&out).unwrap();
    let b = npz::read_all(&whole).unwrap();
    assert_eq!(a["arr_0"].flatten_all().unwrap().to_vec1::<u8>().unwrap(), b["arr_0"].flatten_all().unwrap().to_vec1::<u8>().unwrap());
    assert_eq!(a["arr_1"].to_vec1::<i64>().unwrap(), b["arr_1"].to_vec1::<i64>().unwrap());
}

#[test]
fn shards_merge_back_into_the_whole_run() {
    let dir = tempfile::tempdir().unwrap();
    let c = classifier_file(dir.path(), false);
    let input = sample_npz(dir.path(), "in.npz", 7, None);
    let whole = dir.path().join("whole.npz");
    ok(&["refine", "--input", s(&input), "--output", s(&whole), "--classifier", s(&c), "--batch-size", "3"]);
    let mut shards = Vec::new();
    for k in [2, 0, 1] {
        let p = dir.path().join(format!("shard{k}.npz"));
        ok(&["refine", "--input", s(&input), "--output", s(&p), "--classifier", s(&c), "--batch-size", "3", "--shard", &format!("{k}/3")]);
        shards.push(p);
    }
    let merged = dir.path().join("merged.npz");
    let mut args = vec!["merge", "--output", s(&merged)];
    args.extend(shards.iter().map(|p| s(p)));
    assert!(ok(&args).contains("merged 7 images from 3 shards"));
    let a = npz::read_all(&merged).unwrap();
    let b = npz::read_all(&whole).unwrap();
    assert_eq!(a["arr_0"].flatten_all().unwrap().to_vec1::<u8>().unwrap(), b["arr_0"].flatten_all().unwrap().to_vec1::<u8>().unwrap());
    let line = fails(&["merge", "--output", s(&dir.path().join("m2.npz")), s(&shards[0]), s(&shards[2])]);
    assert!(line.contains("missing"), "{line}");
}

#[test]
fn calibrate_then_pseudo_labels() {
    let dir = tempfile::tempdir().unwrap();
    let c = classifier_file(dir.path(), false);
    let input = sample_npz(dir.path(), "in.npz", 6, None);
    let d = dir.path().join("d.npy");
    ok(&["calibrate", "--input", s(&input), "--classifier", s(&c), "--output", s(&d)]);
    let d_values = Tensor::read_npy(&d).unwrap();
    let classifier = Classifier::load(s(&c), &Device::Cpu).unwrap();
    let x = (npz::read_all(&input).unwrap()["arr_0"].permute((0, 3, 1, 2)).unwrap().to_dtype(DType::F32).unwrap() / 255.0).unwrap();
    let mean = classifier.logits(&x).unwrap().mean(0).unwrap();
    let want = mean.affine(-1.0, 1.0).unwrap();
    assert!(rel_err(&d_values, &want) < 1e-5);
    let out = dir.path().join("out.npz");
    let msg = ok(&["refine", "--input", s(&input), "--output", s(&out), "--classifier", s(&c), "--debias", s(&d)]);
    assert!(msg.contains("pseudo labels"), "{msg}");
    let used = npz::read_all(&out).unwrap()["arr_1"].to_vec1::<i64>().unwrap();
    let want = bigroc::refine::labels::pseudo_labels(&classifier.logits(&x).unwrap(), Some(&d_values)).unwrap();
    assert_eq!(used, want.to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap());
}

#[test]
fn bad_inputs_get_one_line_errors_naming_the_culprit() {
    let dir = tempfile::tempdir().unwrap();
    let c = classifier_file(dir.path(), false);
    let out = dir.path().join("out");
    let so = s(&out);

    // Corrupt image.
    let corrupt = dir.path().join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    image::RgbImage::new(32, 32).save(corrupt.join("fine.png")).unwrap();
    std::fs::write(corrupt.join("broken.png"), b"\x89PNG\r\n\x1a\n garbage").unwrap();
    let line = fails(&["refine", "--input", s(&corrupt), "--output", so, "--classifier", s(&c)]);
    assert!(line.contains("broken.png"), "{line}");

    // Mixed sizes.
    let mixed = dir.path().join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    image::RgbImage::new(32, 32).save(mixed.join("a.png")).unwrap();
    image::RgbImage::new(48, 32).save(mixed.join("b.png")).unwrap();
    let line = fails(&["refine", "--input", s(&mixed), "--output", so, "--classifier", s(&c)]);
    assert!(line.contains("a.png is 32x32") && line.contains("b.png is 48x32") && line.contains("--resize"), "{line}");
    // ... and --resize makes it work.
    ok(&["refine", "--input", s(&mixed), "--output", so, "--classifier", s(&c), "--resize", "32"]);

    // Wrong size for a cifar classifier.
    let small = sample_npz(dir.path(), "small.npz", 1, None);
    let t = Tensor::zeros((1, 16, 16, 3), DType::U8, &Device::Cpu).unwrap();
    npz::write(&small, &[("arr_0", &t)]).unwrap();
    let line = fails(&["refine", "--input", s(&small), "--output", s(&dir.path().join("o1.npz")), "--classifier", s(&c)]);
    assert!(line.contains("32x32") && line.contains("16x16") && line.contains("--resize"), "{line}");

    // Wrong checkpoint: a PyTorch file, and a safetensors file without our metadata.
    let line = fails(&["refine", "--input", s(&small), "--output", s(&dir.path().join("o2.npz")), "--classifier", s(&fixture_path("robustness_cifar18.pt"))]);
    assert!(line.contains("robustness_cifar18.pt") && line.contains("bigroc convert"), "{line}");
    let fixture = fixture_path("resnet_maxpool.safetensors");
    let line = fails(&["refine", "--input", s(&small), "--output", s(&dir.path().join("o3.npz")), "--classifier", s(&fixture)]);
    assert!(line.contains("resnet_maxpool.safetensors"), "{line}");

    // Labels out of range.
    let bad_labels = sample_npz(dir.path(), "labels.npz", 2, Some(vec![3, 10]));
    let line = fails(&["refine", "--input", s(&bad_labels), "--output", s(&dir.path().join("o4.npz")), "--classifier", s(&c)]);
    assert!(line.contains("label 10 of image 1 is out of range"), "{line}");

    // Empty folder.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let line = fails(&["refine", "--input", s(&empty), "--output", s(&dir.path().join("o5")), "--classifier", s(&c)]);
    assert!(line.contains("empty") && line.contains("holds no images"), "{line}");

    // Output location not writable.
    let good = sample_npz(dir.path(), "good.npz", 1, None);
    let line = fails(&["refine", "--input", s(&good), "--output", "/proc/bigroc/out.npz", "--classifier", s(&c)]);
    assert!(line.contains("/proc/bigroc/out.npz"), "{line}");

    // NaN logits.
    let nan = classifier_file(dir.path(), true);
    let line = fails(&["refine", "--input", s(&good), "--output", s(&dir.path().join("o6.npz")), "--classifier", s(&nan)]);
    assert!(line.contains("NaN logits") && line.contains("nan.safetensors") && line.contains("000000.png"), "{line}");
    assert!(!dir.path().join("o6.npz").exists());

    // No labels but --labels gt.
    let line = fails(&["refine", "--input", s(&good), "--output", s(&dir.path().join("o7.npz")), "--classifier", s(&c), "--labels", "gt"]);
    assert!(line.contains("carries no labels"), "{line}");
}
