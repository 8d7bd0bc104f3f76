//! The time-dependent classifier trainer (`bigroc train timed-classifier`):
//! - parity with guided-diffusion-sdk 1.0.0 (`xtask/reference/timed_classifier_fixtures.py`):
//!   q_sample, the classifier's logits, the mean cross-entropy and the gradient of every parameter
//!   (the training step of guided-diffusion's classifier_train.py), and the robust-guidance
//!   paper's early-stopping PGD (each sample's step count exactly, the attacked batch);
//!   error measure max |ours - ref| / max |ref| in f32, tolerance 1e-4;
//! - the frozen view used by the attack shares the trained weights (no copy);
//! - on tiny synthetic data: training lowers the loss, and an interrupted run resumed from its
//!   checkpoint ends bit for bit where an uninterrupted one does;
//! - end to end through the binary: the trained file is what `sample --classifier` reads.

mod common;
use common::ok;

mod adm_support;

use std::path::Path;

use adm_support::{check, fixture_path, rel_err, Fixture};
use bigroc::adm::TimeClassifier;
use bigroc::diffusion::NoiseSchedule;
use bigroc::train::batches::ImageSet;
use bigroc::train::classifier::{RunOptions, TrainReport};
use bigroc::train::early_stop_pgd::{early_stopping_pgd, EarlyStopPgd};
use bigroc::train::optim::{Optimizer, OptimizerConfig};
use bigroc::train::schedule::LrSchedule;
use bigroc::train::state::WorkDir;
use bigroc::train::timed_classifier::{
    save_time_classifier, train_timed_classifier, warm_start, TimedClassifierTraining, TrainableTimeClassifier, CHECKPOINT_KIND,
};
use bigroc_models::adm::{EncoderUNetConfig, Pool};
use candle_core::{DType, Device, Tensor};

const TOL: f64 = 1e-4;

/// The fixture's classifier as a trainable network holding the fixture's weights.
fn fixture_net(fx: &Fixture) -> TrainableTimeClassifier {
    let cfg: EncoderUNetConfig = fx.config_of("model").unwrap();
    let net = TrainableTimeClassifier::new(&cfg, 0, &Device::Cpu).unwrap();
    let params = net.parameters();
    let stored = fx.tensors.keys().filter(|k| k.starts_with("model.")).count();
    assert_eq!(params.len(), stored, "parameter count differs from the reference state dict");
    for (name, var) in &params {
        let w = fx.get(&format!("model.{name}")).unwrap().to_dtype(DType::F32).unwrap();
        var.set(&w).unwrap();
    }
    net
}

fn timesteps(t: &Tensor) -> (Vec<usize>, Tensor) {
    let t: Vec<i64> = t.to_vec1().unwrap();
    let idx: Vec<usize> = t.iter().map(|&v| v as usize).collect();
    let f = Tensor::new(t.iter().map(|&v| v as f32).collect::<Vec<_>>(), &Device::Cpu).unwrap();
    (idx, f)
}

#[test]
fn training_step_matches_guided_diffusion() {
    let fx = Fixture::load("timed_classifier").unwrap();
    let net = fixture_net(&fx);
    let (t, tf) = timesteps(&fx.get("t").unwrap());
    let y = fx.get("y").unwrap().to_dtype(DType::U32).unwrap();
    let (x0, noise) = (fx.get("x0").unwrap(), fx.get("noise").unwrap());
    let base = TimedClassifierTraining {
        model: fx.config_of("model").unwrap(),
        diffusion_steps: 1000,
        noise_schedule: NoiseSchedule::Linear,
        iterations: 1,
        batch_size: 4,
        lr: 3e-4,
        schedule: LrSchedule::Linear,
        optimizer: OptimizerConfig::adamw(0.05),
        attack: None,
        crop_padding: 0,
        seed: 0,
    };
    let x_t = base.diffusion().unwrap().q_sample(&x0, &t, &noise).unwrap();
    check("q_sample (linear)", &x_t, &fx.get("x_t").unwrap(), TOL).unwrap();
    let cosine = TimedClassifierTraining { noise_schedule: NoiseSchedule::Cosine, ..base.clone() };
    let x_t_cos = cosine.diffusion().unwrap().q_sample(&x0, &t, &noise).unwrap();
    check("q_sample (cosine)", &x_t_cos, &fx.get("x_t_cosine").unwrap(), TOL).unwrap();

    let (logits, loss) = net.loss(&x_t, &tf, &y).unwrap();
    check("logits", &logits, &fx.get("logits").unwrap(), TOL).unwrap();
    check("mean cross-entropy", &loss.reshape(1).unwrap(), &fx.get("loss").unwrap(), TOL).unwrap();
    let grads = loss.backward().unwrap();
    // Per parameter, max |ours - ref| over the larger of max |ref| and the largest reference
    // gradient of the same layer's weight. The layer scale matters for biases whose gradient is
    // mathematically zero: at 32 channels each GroupNorm group holds one channel, so a per-channel
    // constant added to the residual stream (every conv bias, every attention `proj_out` bias) is
    // erased by the next normalization on every path to the logits; both sides then hold f32
    // rounding noise (~1e-9) that no per-tensor relative measure can compare. The strict per-tensor
    // figure is reported too.
    let max_abs = |t: &Tensor| t.abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let (mut worst, mut worst_name, mut strict_ok, mut strict_worst) = (0f64, String::new(), 0, 0f64);
    let params = net.parameters();
    for (name, var) in &params {
        let ours = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for `{name}`"));
        let reference = fx.get(&format!("grad.{name}")).unwrap();
        let layer = name.rsplit_once('.').map_or(name.as_str(), |(l, _)| l);
        let layer_scale = fx.get(&format!("grad.{layer}.weight")).map_or(0.0, |w| max_abs(&w));
        let diff = max_abs(&(ours - &reference).unwrap());
        let e = diff / max_abs(&reference).max(layer_scale).max(1e-30);
        let strict = rel_err(ours, &reference).unwrap();
        if strict <= TOL {
            strict_ok += 1;
            strict_worst = strict_worst.max(strict);
        } else {
            println!("  `{name}`: per-tensor {strict:.2e} (max |ref| {:.1e}, max |diff| {diff:.1e}), of the layer's scale {e:.2e}", max_abs(&reference));
        }
        assert!(e <= TOL, "gradient of `{name}`: relative error {e:.3e} (per tensor {strict:.3e})");
        if e > worst {
            (worst, worst_name) = (e, name.clone());
        }
    }
    println!(
        "{} parameter gradients: max rel err {worst:.3e} of the layer's gradient scale (`{worst_name}`); \
         {strict_ok} within {TOL:.0e} per tensor (max {strict_worst:.3e}), the rest listed above",
        params.len()
    );
    // The frozen view computes the same logits from the same (shared) weights (to rounding: its
    // frozen layers run the fused inference ops, the trained model the composed ones).
    let frozen = net.frozen.forward(&x_t, &tf).unwrap();
    let e = rel_err(&frozen, &logits).unwrap();
    assert!(e < 1e-5, "frozen view vs trained model: {e:.2e}");
}

#[test]
fn early_stopping_attack_matches_the_reference() {
    let fx = Fixture::load("timed_classifier").unwrap();
    let net = fixture_net(&fx);
    let pgd = &fx.config["pgd"];
    let cfg = EarlyStopPgd {
        eps: pgd["eps"].as_f64().unwrap(),
        step_size: pgd["step_size"].as_f64().unwrap(),
        steps: pgd["steps"].as_u64().unwrap() as usize,
    };
    let x = fx.get("pgd.x").unwrap();
    let (_, tf) = timesteps(&fx.get("pgd.t").unwrap());
    let y = fx.get("pgd.y").unwrap().to_dtype(DType::U32).unwrap();
    let out = early_stopping_pgd(&|x| net.frozen.forward(x, &tf), &x, &y, &cfg).unwrap();
    let want: Vec<i64> = fx.get("pgd.steps").unwrap().to_vec1().unwrap();
    assert_eq!(out.moved.iter().map(|&m| m as i64).collect::<Vec<_>>(), want, "steps per sample");
    assert_eq!(out.clean_correct, Some(want.iter().filter(|&&m| m > 0).count()));
    let reference = fx.get("pgd.output").unwrap();
    check("attacked batch", &out.images, &reference, TOL).unwrap();
    // The perturbation itself, relative to its own size (a stricter measure).
    let (ours_d, ref_d) = ((&out.images - &x).unwrap(), (&reference - &x).unwrap());
    check("perturbation", &ours_d, &ref_d, TOL).unwrap();
    let logits = net.frozen.forward(&out.images, &tf).unwrap();
    check("logits of the attacked batch", &logits, &fx.get("pgd.logits").unwrap(), TOL).unwrap();
    // Samples misclassified at the start (the reference's 0 steps) are returned untouched.
    for (i, &m) in want.iter().enumerate() {
        if m == 0 {
            let a = out.images.get(i).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(a, x.get(i).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), "sample {i} moved");
        }
    }
}

#[test]
fn frozen_view_follows_every_update_without_a_copy() {
    let fx = Fixture::load("timed_classifier").unwrap();
    let net = fixture_net(&fx);
    let (_, tf) = timesteps(&fx.get("t").unwrap());
    let x_t = fx.get("x_t").unwrap();
    let y = fx.get("y").unwrap().to_dtype(DType::U32).unwrap();
    let before = net.frozen.forward(&x_t, &tf).unwrap().to_vec2::<f32>().unwrap();
    let mut opt = Optimizer::new(OptimizerConfig::adamw(0.05), net.parameters());
    let (_, loss) = net.loss(&x_t, &tf, &y).unwrap();
    opt.step(&loss.backward().unwrap(), 1e-2).unwrap();
    let live = net.model.forward(&x_t, &tf).unwrap().to_vec2::<f32>().unwrap();
    let frozen = net.frozen.forward(&x_t, &tf).unwrap();
    assert_ne!(live, before, "the step changed nothing");
    let live = Tensor::new(live, &candle_core::Device::Cpu).unwrap();
    let before = Tensor::new(before, &candle_core::Device::Cpu).unwrap();
    // Equal to rounding (fused inference ops against the composed training ops), far from before.
    let (to_live, step) = (rel_err(&frozen, &live).unwrap(), rel_err(&before, &live).unwrap());
    assert!(to_live < 1e-5 && step > 1e-3, "the frozen view missed the update: {to_live:.2e} from the live model, step {step:.2e}");
    // The frozen view tracks no weights: its backward reaches the input only.
    let v = candle_core::Var::from_tensor(&x_t).unwrap();
    let grads = net.frozen.forward(v.as_tensor(), &tf).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(grads.get(v.as_tensor()).is_some());
    assert!(net.parameters().iter().all(|(_, p)| grads.get(p.as_tensor()).is_none()));
}

// ---------------------------------------------------------------------------------------------
// training on tiny synthetic data

/// 8x8 images of two classes told apart by which half is brighter, plus noise.
fn two_class_images(n: usize, seed: u64) -> ImageSet {
    let (h, w) = (8, 8);
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
            for _ in 0..w * 3 {
                let base = if (r < h / 2) == (label == 0) { 200 } else { 55 };
                pixels.push((base + (next() % 40) as i32 - 20) as u8);
            }
        }
        labels.push(label);
    }
    ImageSet { pixels, labels, height: h, width: w, classes: vec!["top".into(), "bottom".into()] }
}

fn tiny_config(attack: bool) -> TimedClassifierTraining {
    TimedClassifierTraining {
        model: EncoderUNetConfig {
            image_size: 8,
            in_channels: 3,
            model_channels: 32,
            out_channels: 2,
            num_res_blocks: 1,
            attention_resolutions: vec![2],
            dropout: 0.0,
            channel_mult: vec![1.0, 1.0],
            conv_resample: true,
            num_heads: 1,
            num_head_channels: Some(32),
            use_scale_shift_norm: true,
            resblock_updown: true,
            use_new_attention_order: false,
            pool: Pool::Attention,
        },
        diffusion_steps: 1000,
        noise_schedule: NoiseSchedule::Linear,
        iterations: 6,
        batch_size: 16,
        lr: 3e-3,
        schedule: LrSchedule::Linear,
        optimizer: OptimizerConfig::adamw(0.05),
        attack: attack.then_some(EarlyStopPgd { eps: 0.5, step_size: 0.5 / 6.0, steps: 3 }),
        crop_padding: 1,
        seed: 5,
    }
}

fn run(cfg: &TimedClassifierTraining, data: &ImageSet, dir: &Path, resume: bool, stop_after: Option<usize>, test: Option<&ImageSet>) -> (TrainableTimeClassifier, TrainReport) {
    let work = WorkDir::open(dir, CHECKPOINT_KIND, resume).unwrap();
    let net = TrainableTimeClassifier::new(&cfg.model, cfg.seed, &Device::Cpu).unwrap();
    let report = train_timed_classifier(cfg, data, &net, &RunOptions {
        device: Device::Cpu,
        work_dir: &work,
        resume,
        checkpoint_every: 1000,
        log_every: 1,
        test,
        stop_after,
        time_limit: None,
        progress: false,
    })
    .unwrap();
    (net, report)
}

fn weights(net: &TrainableTimeClassifier) -> Vec<(String, Vec<f32>)> {
    let mut w: Vec<(String, Vec<f32>)> = net
        .weights(false)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn training_lowers_the_noisy_loss() {
    let data = two_class_images(64, 1);
    let test = two_class_images(32, 2);
    for attack in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = tiny_config(attack);
        cfg.iterations = 24;
        // The test set's noisy loss before any training (the same fixed t and noise per image).
        let untrained = TrainableTimeClassifier::new(&cfg.model, cfg.seed, &Device::Cpu).unwrap();
        let diffusion = cfg.diffusion().unwrap();
        let (loss0, _) = bigroc::train::timed_classifier::evaluate(&untrained, &diffusion, &test, cfg.seed, &Device::Cpu).unwrap();
        let (_, report) = run(&cfg, &data, dir.path(), false, None, Some(&test));
        assert!(report.finished && report.steps == 24, "{report:?}");
        let log = metrics(dir.path());
        let test_loss = log.iter().find_map(|r| r.get("test_loss").and_then(|v| v.as_f64())).unwrap();
        let train: Vec<f64> = log.iter().filter_map(|r| r.get("loss").and_then(|v| v.as_f64())).collect();
        assert_eq!(train.len(), 24);
        if attack {
            assert!(log.iter().all(|r| r.get("loss").is_none() || r.get("clean_train_accuracy").is_some()));
        }
        let first = train[..6].iter().sum::<f64>() / 6.0;
        let last = train[18..].iter().sum::<f64>() / 6.0;
        println!(
            "attack {attack}: train loss {first:.4} (first 6) -> {last:.4} (last 6); noisy test loss {loss0:.4} -> {test_loss:.4}, accuracy {:.3}",
            report.test_accuracy.unwrap()
        );
        assert!(last < 0.85 * first, "train loss did not fall: {train:?}");
        assert!(test_loss < 0.85 * loss0, "test loss did not fall: {loss0} -> {test_loss}");
    }
}

#[test]
fn resume_continues_bit_for_bit() {
    let data = two_class_images(40, 3);
    let cfg = tiny_config(true); // 6 iterations of 16 over 2 full batches per epoch
    let whole = tempfile::tempdir().unwrap();
    let (straight, r) = run(&cfg, &data, whole.path(), false, None, None);
    assert!(r.finished && r.steps == 6);
    // Interrupted after 3 iterations (mid-epoch: epoch 1, batch 1), then resumed by a fresh process.
    let parts = tempfile::tempdir().unwrap();
    let (_, r) = run(&cfg, &data, parts.path(), false, Some(3), None);
    assert!(!r.finished && r.steps == 3);
    let (resumed, r) = run(&cfg, &data, parts.path(), true, None, None);
    assert!(r.finished && r.steps == 6);
    assert_eq!(weights(&straight), weights(&resumed), "resumed run differs from the uninterrupted one");
    // The same metrics, each step once.
    let (a, b) = (metrics(whole.path()), metrics(parts.path()));
    let strip = |v: &[serde_json::Value]| -> Vec<(u64, f64)> {
        v.iter().map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap())).collect()
    };
    assert_eq!(strip(&a), strip(&b));
    assert_eq!(strip(&b).iter().map(|s| s.0).collect::<Vec<_>>(), (1..=6).collect::<Vec<u64>>());
    // Another setting is refused on resume, naming the field.
    let mut other = cfg.clone();
    other.attack = Some(EarlyStopPgd { eps: 1.0, step_size: 0.1, steps: 3 });
    let work = WorkDir::open(parts.path(), CHECKPOINT_KIND, true).unwrap();
    let net = TrainableTimeClassifier::new(&other.model, other.seed, &Device::Cpu).unwrap();
    let opts = RunOptions { device: Device::Cpu, work_dir: &work, resume: true, checkpoint_every: 10, log_every: 1, test: None, stop_after: None, time_limit: None, progress: false };
    let err = train_timed_classifier(&other, &data, &net, &opts).err().unwrap().to_string();
    assert!(err.contains("attack.eps: checkpoint 0.5 vs now 1.0"), "{err}");
}

/// guided-diffusion's initialization: zero_module layers at 0, GroupNorm affine 1/0, convolution
/// and linear parameters uniform within +-1/sqrt(fan_in), positional embedding ~ N(0, 1/C).
#[test]
fn initialization_follows_guided_diffusion() {
    let cfg = tiny_config(false);
    let net = TrainableTimeClassifier::new(&cfg.model, 7, &Device::Cpu).unwrap();
    let values = |name: &str| -> Vec<f32> {
        let p = net.parameters().into_iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no `{name}`")).1;
        p.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    };
    for zero in ["input_blocks.1.0.out_layers.3.weight", "input_blocks.1.0.out_layers.3.bias", "input_blocks.3.1.proj_out.weight", "middle_block.1.proj_out.bias"] {
        assert!(values(zero).iter().all(|&v| v == 0.0), "{zero} is not zero");
    }
    assert!(values("input_blocks.1.0.in_layers.0.weight").iter().all(|&v| v == 1.0));
    assert!(values("out.0.bias").iter().all(|&v| v == 0.0));
    for (name, fan_in) in [("input_blocks.0.0.weight", 27.0), ("input_blocks.0.0.bias", 27.0), ("time_embed.2.bias", 128.0), ("out.2.qkv_proj.weight", 32.0)] {
        let v = values(name);
        let bound = 1.0 / f32::sqrt(fan_in);
        let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(max <= bound && max > 0.8 * bound, "{name}: max |v| {max} vs bound {bound}");
    }
    let pe = values("out.2.positional_embedding");
    let std = (pe.iter().map(|v| v * v).sum::<f32>() / pe.len() as f32).sqrt();
    assert!((std - 1.0 / 32f32.sqrt()).abs() < 0.03, "positional embedding std {std}");
    // Seeded: the same seed gives the same network.
    let again = TrainableTimeClassifier::new(&cfg.model, 7, &Device::Cpu).unwrap();
    assert_eq!(weights(&net), weights(&again));
}

#[test]
fn saved_file_loads_as_a_time_classifier() {
    let cfg = tiny_config(true);
    let net = TrainableTimeClassifier::new(&cfg.model, 1, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &Device::Cpu).unwrap();
    let t = Tensor::new(&[5f32, 900.0], &Device::Cpu).unwrap();
    let want = net.frozen.forward(&x, &t).unwrap();
    for half in [false, true] {
        let path = dir.path().join(format!("c{half}.safetensors"));
        let classes = vec!["top".to_string(), "bottom".to_string()];
        save_time_classifier(&path, &cfg, &net, &classes, Some("toy".into()), "test".into(), half).unwrap();
        let loaded = TimeClassifier::load(path.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(loaded.model.config(), &cfg.model);
        assert_eq!(loaded.info.training.as_deref(), Some("robust"));
        assert_eq!(loaded.info.classes, classes);
        let got = loaded.model.forward(&x, &t).unwrap();
        let e = rel_err(&got, &want).unwrap();
        println!("reloaded (f16 storage {half}): logits rel err {e:.2e}");
        assert!(if half { e < 2e-2 } else { e == 0.0 }, "{e}");
    }
}

/// A warm start from a written classifier file sets every weight, and the frozen view the attack
/// uses sees them too.
#[test]
fn warm_start_takes_a_written_classifier() {
    let cfg = tiny_config(true);
    let trained = TrainableTimeClassifier::new(&cfg.model, 1, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    save_time_classifier(&path, &cfg, &trained, &["top".into(), "bottom".into()], None, "test".into(), false).unwrap();
    let fresh = TrainableTimeClassifier::new(&cfg.model, 2, &Device::Cpu).unwrap();
    assert_ne!(weights(&fresh), weights(&trained));
    warm_start(&fresh, &cfg, &path, &Device::Cpu).unwrap();
    assert_eq!(weights(&fresh), weights(&trained));
    let x = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &Device::Cpu).unwrap();
    let t = Tensor::new(&[5f32, 900.0], &Device::Cpu).unwrap();
    let (want, got) = (trained.frozen.forward(&x, &t).unwrap(), fresh.frozen.forward(&x, &t).unwrap());
    assert_eq!(rel_err(&got, &want).unwrap(), 0.0);
}

// ---------------------------------------------------------------------------------------------
// end to end through the binary

#[test]
fn cli_trains_a_classifier_that_sample_uses() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 10 classes of 8x8 images (the class count and size of the sampler fixture's UNet).
    let data = d.join("data");
    for c in 0..10u8 {
        let folder = data.join(format!("class{c}"));
        std::fs::create_dir_all(&folder).unwrap();
        for i in 0..2u8 {
            let img = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([c * 25, (x as u8) * 30 + i, (y as u8) * 30]));
            img.save(folder.join(format!("{i}.png"))).unwrap();
        }
    }
    let clf = d.join("clf.safetensors");
    let stdout = ok(&[
        "train", "timed-classifier", "--data", data.to_str().unwrap(), "--output", clf.to_str().unwrap(), "--adversarial",
        "--attack-steps", "2", "--iterations", "2", "--batch-size", "10", "--width", "32", "--depth", "1", "--channel-mult",
        "1,2", "--attention-resolutions", "4", "--device", "cpu", "--log-every", "1", "--half",
    ]);
    assert!(stdout.contains("wrote"), "{stdout}");
    let loaded = TimeClassifier::load(clf.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(loaded.info.training.as_deref(), Some("robust"));
    assert_eq!(loaded.num_classes(), 10);
    let flags = &loaded.info.flags;
    assert_eq!(flags["attack"]["eps"], 0.5);
    assert!((flags["attack"]["step_size"].as_f64().unwrap() - 0.5 / 6.0).abs() < 1e-12, "{flags}");
    assert_eq!(flags["optimizer"]["weight_decay"], 0.05);
    assert_eq!(flags["lr"], 3e-4);

    // A diffusion UNet converted from the sampler fixture, guided by the trained classifier.
    let unet = d.join("unet.safetensors");
    let pt = fixture_path("adm_improved_unet").with_extension("pt");
    ok(&[
        "convert", "--from", "guided-diffusion", pt.to_str().unwrap(), "--kind", "unet", "--output", unet.to_str().unwrap(),
        "--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,1",
        "--attention_resolutions", "4", "--num_heads", "4", "--learn_sigma", "True", "--class_cond", "True",
        "--num_classes", "10", "--rescale_timesteps", "True", "--diffusion_steps", "1000", "--noise_schedule", "linear",
        "--use_fp16", "False",
    ]);
    let out = d.join("s.npz");
    ok(&[
        "sample", "--model", unet.to_str().unwrap(), "--classifier", clf.to_str().unwrap(), "--guidance", "robust",
        "--num", "2", "--timestep-respacing", "4", "--device", "cpu", "--output", out.to_str().unwrap(),
    ]);
    assert_eq!(bigroc::data::npz::read_samples(&out).unwrap().images.dims(), &[2, 8, 8, 3]);
}
