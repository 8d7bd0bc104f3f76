//! The classifier trainer on tiny synthetic data: it learns, and an interrupted run resumed from
//! its checkpoint ends bit for bit where an uninterrupted one does.

use bigroc::refine::{Norm, PgdConfig};
use bigroc::train::batches::ImageSet;
use bigroc::train::classifier::{train_classifier, ClassifierTraining, RunOptions, TrainableResNet, CHECKPOINT_KIND};
use bigroc::train::optim::OptimizerConfig;
use bigroc::train::schedule::LrSchedule;
use bigroc::train::state::WorkDir;
use bigroc_models::resnet::ResNetConfig;
use candle_core::Device;

/// Two classes told apart by which half of the image is brighter, plus noise.
fn two_class_images(n: usize, seed: u64) -> ImageSet {
    let (h, w) = (32, 32);
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let mut pixels = Vec::with_capacity(n * h * w * 3);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let label = (i % 2) as u32;
        for r in 0..h {
            for _c in 0..w {
                let bright = (r < h / 2) == (label == 0);
                for _ in 0..3 {
                    let base = if bright { 150 } else { 90 };
                    pixels.push((base + (next() % 60) as i32 - 30) as u8);
                }
            }
        }
        labels.push(label);
    }
    ImageSet { pixels, labels, height: h, width: w, classes: vec!["top".into(), "bottom".into()] }
}

fn config(attack: bool) -> ClassifierTraining {
    ClassifierTraining {
        model: ResNetConfig::cifar(18, 0.0625, 2).unwrap(),
        epochs: 2,
        batch_size: 16,
        lr: 0.05,
        schedule: LrSchedule::Cosine,
        optimizer: OptimizerConfig::sgd(0.9, 5e-4),
        attack: attack.then_some(PgdConfig { norm: Norm::L2, eps: 0.25, step_size: 0.1, steps: 2, use_best: true }),
        crop_padding: 4,
        seed: 3,
    }
}

fn run(cfg: &ClassifierTraining, data: &ImageSet, dir: &std::path::Path, resume: bool, stop_after: Option<usize>) -> (TrainableResNet, bigroc::train::classifier::TrainReport) {
    let work = WorkDir::open(dir, CHECKPOINT_KIND, resume).unwrap();
    let net = TrainableResNet::new(&cfg.model, cfg.seed, &Device::Cpu).unwrap();
    let report = train_classifier(cfg, data, &net, &RunOptions {
        device: Device::Cpu,
        work_dir: &work,
        resume,
        checkpoint_every: 1000,
        log_every: 1,
        test: None,
        stop_after,
        time_limit: None,
        progress: false,
    })
    .unwrap();
    (net, report)
}

fn weights(net: &TrainableResNet) -> Vec<(String, Vec<f32>)> {
    let mut w: Vec<(String, Vec<f32>)> = net
        .weights(false)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

#[test]
fn adversarial_training_lowers_the_loss() {
    let data = two_class_images(64, 1);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(true);
    cfg.epochs = 4;
    let (_, report) = run(&cfg, &data, dir.path(), false, None);
    assert!(report.finished && report.steps == 16, "{report:?}");
    let log = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap().get("loss").and_then(|v| v.as_f64()))
        .collect();
    assert_eq!(losses.len(), 16, "{log}");
    let first: f64 = losses[..4].iter().sum::<f64>() / 4.0;
    let last: f64 = losses[12..].iter().sum::<f64>() / 4.0;
    println!("mean loss of the first 4 steps {first:.4}, of the last 4 {last:.4}");
    assert!(last < 0.8 * first, "loss did not fall: {losses:?}");
}

#[test]
fn resume_continues_bit_for_bit() {
    let data = two_class_images(40, 2);
    let cfg = config(true);
    let whole = tempfile::tempdir().unwrap();
    let (straight, r) = run(&cfg, &data, whole.path(), false, None);
    assert_eq!(r.steps, 6); // 2 epochs of ceil(40 / 16) batches
    // Interrupted mid-epoch (after 4 steps: epoch 1, batch 1), then resumed by a fresh process.
    let parts = tempfile::tempdir().unwrap();
    let (_, r) = run(&cfg, &data, parts.path(), false, Some(4));
    assert!(!r.finished && r.steps == 4);
    let (resumed, r) = run(&cfg, &data, parts.path(), true, None);
    assert!(r.finished && r.steps == 6);
    assert_eq!(weights(&straight), weights(&resumed), "resumed run differs from the uninterrupted one");
    // The metrics log of the resumed run has each step once.
    let steps: Vec<u64> = std::fs::read_to_string(parts.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64())
        .collect();
    assert_eq!(steps, (1..=6).collect::<Vec<u64>>());
}

#[test]
fn refuses_to_overwrite_or_resume_with_other_settings() {
    let data = two_class_images(16, 3);
    let cfg = config(false);
    let dir = tempfile::tempdir().unwrap();
    run(&cfg, &data, dir.path(), false, Some(1));
    let err = WorkDir::open(dir.path(), CHECKPOINT_KIND, false).err().unwrap().to_string();
    assert!(err.contains("checkpoint.safetensors") && err.contains("--resume"), "{err}");
    let mut other = cfg.clone();
    other.lr = 0.2;
    let work = WorkDir::open(dir.path(), CHECKPOINT_KIND, true).unwrap();
    let net = TrainableResNet::new(&other.model, other.seed, &Device::Cpu).unwrap();
    let err = train_classifier(&other, &data, &net, &RunOptions {
        device: Device::Cpu,
        work_dir: &work,
        resume: true,
        checkpoint_every: 1000,
        log_every: 1,
        test: None,
        stop_after: None,
        time_limit: None,
        progress: false,
    })
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("lr: checkpoint 0.05 vs now 0.2"), "{err}");
}
