//! The diffusion UNet trainer (`bigroc train diffusion`):
//! - parity with guided-diffusion-sdk 1.0.0's `GaussianDiffusion.training_losses`
//!   (`xtask/reference/diffusion_train_fixtures.py`): the per-image mse, vb and loss terms of a
//!   class-conditional learned-sigma UNet (RESCALED_MSE at 500 steps, so the VB factor 0.5 is
//!   exercised; t = 0 takes the decoder NLL branch) and the gradient of every parameter of the
//!   batch-mean loss; error measure max |ours - ref| / max |ref| in f32, tolerance 1e-4;
//! - the EMA update is guided-diffusion's `update_ema` formula;
//! - on tiny synthetic data: training lowers the loss on a fixed batch, and an interrupted run
//!   resumed from its checkpoint ends bit for bit (weights, EMA, metrics) where an uninterrupted
//!   one does;
//! - the default CIFAR-10 UNet is small (f16 file <= 40 MB) and initialized as guided-diffusion;
//! - end to end through the binary: the trained file is what `sample --model` reads.

mod adm_support;

use std::path::Path;
use std::time::Duration;
use std::process::{Command, Output};

use adm_support::{check, rel_err, Fixture};
use bigroc::adm::DiffusionModel;
use bigroc::diffusion::NoiseSchedule;
use bigroc::train::batches::ImageSet;
use bigroc::train::classifier::{RunOptions, TrainReport};
use bigroc::train::diffusion::{
    batch_losses, cifar10_unet, save_unet, train_diffusion, warm_start, DiffusionTraining, Ema, TrainableUNet, CHECKPOINT_KIND,
};
use bigroc::train::optim::OptimizerConfig;
use bigroc::train::schedule::LrSchedule;
use bigroc::train::state::WorkDir;
use bigroc_models::adm::UNetConfig;
use candle_core::{DType, Device, Tensor, Var};

const TOL: f64 = 1e-4;

fn max_abs(t: &Tensor) -> f64 {
    t.abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn fixture_config(fx: &Fixture) -> DiffusionTraining {
    let d = &fx.config["diffusion"];
    DiffusionTraining {
        model: fx.config_of("model").unwrap(),
        diffusion_steps: d["steps"].as_u64().unwrap() as usize,
        noise_schedule: NoiseSchedule::Linear,
        rescale_timesteps: d["rescale_timesteps"].as_bool().unwrap(),
        rescale_learned_sigmas: d["rescale_learned_sigmas"].as_bool().unwrap(),
        iterations: 1,
        batch_size: 4,
        lr: 1e-4,
        schedule: LrSchedule::Constant,
        optimizer: OptimizerConfig::adamw(0.0),
        ema_rate: 0.9999,
        flip: true,
        seed: 0,
    }
}

#[test]
fn training_losses_and_gradients_match_guided_diffusion() {
    let fx = Fixture::load("diffusion_train").unwrap();
    let cfg = fixture_config(&fx);
    assert_eq!(cfg.diffusion_steps, 500, "the fixture should exercise the VB rescaling");
    let net = TrainableUNet::new(&cfg.model, 0, &Device::Cpu).unwrap();
    let params = net.parameters();
    let stored = fx.tensors.keys().filter(|k| k.starts_with("model.")).count();
    assert_eq!(params.len(), stored, "parameter count differs from the reference state dict");
    for (name, var) in &params {
        var.set(&fx.get(&format!("model.{name}")).unwrap().to_dtype(DType::F32).unwrap()).unwrap();
    }
    let t: Vec<usize> = fx.get("t").unwrap().to_vec1::<i64>().unwrap().iter().map(|&v| v as usize).collect();
    assert!(t.contains(&0) && t.iter().any(|&v| v > 0), "both VB branches");
    let y = fx.get("y").unwrap().to_dtype(DType::U32).unwrap();
    let (x0, noise) = (fx.get("x0").unwrap(), fx.get("noise").unwrap());
    let terms = batch_losses(&net, &cfg.diffusion().unwrap(), cfg.rescale_learned_sigmas, &x0, &t, &noise, Some(&y)).unwrap();
    check("mse", &terms.mse, &fx.get("mse").unwrap(), TOL).unwrap();
    check("vb", terms.vb.as_ref().unwrap(), &fx.get("vb").unwrap(), TOL).unwrap();
    check("loss", &terms.loss, &fx.get("loss").unwrap(), TOL).unwrap();
    // Loss type MSE (no rescaling) at 500 steps: the same VB twice as large.
    let plain = batch_losses(&net, &cfg.diffusion().unwrap(), false, &x0, &t, &noise, Some(&y)).unwrap();
    let halved = (plain.vb.as_ref().unwrap() * 0.5).unwrap();
    check("vb without rescale_learned_sigmas, halved", &halved, &fx.get("vb").unwrap(), TOL).unwrap();
    let loss = terms.loss.mean_all().unwrap();
    check("batch-mean loss", &loss.reshape(1).unwrap(), &fx.get("loss_mean").unwrap(), TOL).unwrap();
    let grads = loss.backward().unwrap();
    // Per parameter, max |ours - ref| over the larger of max |ref| and the largest reference
    // gradient of the same layer's weight (as tests/timed_classifier.rs): at 32 channels each
    // GroupNorm group holds one channel, so a per-channel constant added right before a
    // normalization (e.g. a convolution bias feeding only normalized paths) has a gradient that is
    // mathematically zero, and both sides hold f32 rounding noise that a per-tensor relative
    // measure cannot compare. The strict per-tensor figure is printed for every such tensor.
    let (mut worst, mut worst_name, mut strict_ok, mut strict_worst) = (0f64, String::new(), 0, 0f64);
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
}

/// A fixed-variance (3-channel) unconditional UNet trains on the MSE alone.
#[test]
fn fixed_sigma_loss_is_the_mse() {
    let mut model = tiny_unet();
    model.out_channels = 3;
    model.num_classes = None;
    let cfg = DiffusionTraining { model, ..tiny_config() };
    assert!(!cfg.learn_sigma() && !cfg.diffusion_config().learn_sigma);
    let net = TrainableUNet::new(&cfg.model, 2, &Device::Cpu).unwrap();
    let x0 = Tensor::rand(-1f32, 1.0, (3, 3, 8, 8), &Device::Cpu).unwrap();
    let noise = Tensor::randn(0f32, 1.0, (3, 3, 8, 8), &Device::Cpu).unwrap();
    let terms = batch_losses(&net, &cfg.diffusion().unwrap(), true, &x0, &[0, 10, 999], &noise, None).unwrap();
    assert!(terms.vb.is_none());
    assert_eq!(terms.loss.to_vec1::<f32>().unwrap(), terms.mse.to_vec1::<f32>().unwrap());
    // The output convolution starts at zero, so the first prediction is 0 and the MSE is E[noise^2].
    let want = noise.sqr().unwrap().flatten_from(1).unwrap().mean(1).unwrap();
    assert_eq!(terms.mse.to_vec1::<f32>().unwrap(), want.to_vec1::<f32>().unwrap());
}

#[test]
fn ema_update_follows_the_formula() {
    let dev = Device::Cpu;
    let w = Var::new(&[1.0f32, -2.0, 0.5], &dev).unwrap();
    let params = vec![("w".to_string(), w.clone())];
    let rate = 0.9;
    let mut ema = Ema::new(rate, &params).unwrap();
    let mut expected = vec![1.0f32, -2.0, 0.5];
    for step in 0..3 {
        let new: Vec<f32> = w.as_tensor().to_vec1::<f32>().unwrap().iter().map(|v| v * 0.5 + step as f32).collect();
        w.set(&Tensor::new(new.as_slice(), &dev).unwrap()).unwrap();
        ema.update(&params).unwrap();
        // update_ema: targ.mul_(rate).add_(src, alpha=1 - rate), in f32.
        for (e, p) in expected.iter_mut().zip(&new) {
            *e = *e * rate as f32 + p * (1.0 - rate) as f32;
        }
        let got = ema.tensors[0].1.to_vec1::<f32>().unwrap();
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() <= 1e-6 * e.abs().max(1.0), "step {step}: {got:?} vs {expected:?}");
        }
    }
    // The average is a copy: it is not the variable's storage.
    assert_ne!(ema.tensors[0].1.to_vec1::<f32>().unwrap(), w.as_tensor().to_vec1::<f32>().unwrap());
    // Its state round-trips.
    let mut other = Ema::new(rate, &params).unwrap();
    other.load_state(&ema.state()).unwrap();
    assert_eq!(other.tensors[0].1.to_vec1::<f32>().unwrap(), ema.tensors[0].1.to_vec1::<f32>().unwrap());
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

fn tiny_unet() -> UNetConfig {
    UNetConfig {
        image_size: 8,
        in_channels: 3,
        model_channels: 32,
        out_channels: 6,
        num_res_blocks: 1,
        attention_resolutions: vec![2],
        dropout: 0.0,
        channel_mult: vec![1.0, 1.0],
        conv_resample: true,
        num_classes: Some(2),
        num_heads: 1,
        num_head_channels: Some(32),
        num_heads_upsample: None,
        use_scale_shift_norm: true,
        resblock_updown: false,
        use_new_attention_order: false,
    }
}

fn tiny_config() -> DiffusionTraining {
    DiffusionTraining {
        model: tiny_unet(),
        diffusion_steps: 1000,
        noise_schedule: NoiseSchedule::Linear,
        rescale_timesteps: false,
        rescale_learned_sigmas: true,
        iterations: 6,
        batch_size: 16,
        lr: 2e-3,
        schedule: LrSchedule::Constant,
        optimizer: OptimizerConfig::adamw(0.0),
        ema_rate: 0.9,
        flip: true,
        seed: 5,
    }
}

fn run(cfg: &DiffusionTraining, data: &ImageSet, dir: &Path, resume: bool, stop_after: Option<usize>) -> (TrainableUNet, Ema, TrainReport) {
    let work = WorkDir::open(dir, CHECKPOINT_KIND, resume).unwrap();
    let net = TrainableUNet::new(&cfg.model, cfg.seed, &Device::Cpu).unwrap();
    let mut ema = Ema::new(cfg.ema_rate, &net.parameters()).unwrap();
    let report = train_diffusion(cfg, data, &net, &mut ema, &RunOptions {
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
    (net, ema, report)
}

fn weights(net: &TrainableUNet) -> Vec<(String, Vec<f32>)> {
    net.parameters().into_iter().map(|(k, v)| (k, v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect()
}

fn ema_weights(ema: &Ema) -> Vec<(String, Vec<f32>)> {
    ema.tensors.iter().map(|(k, t)| (k.clone(), t.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect()
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The mean loss of `net` on a fixed batch (fixed t over the whole range, fixed noise).
fn fixed_batch_loss(net: &TrainableUNet, cfg: &DiffusionTraining, data: &ImageSet) -> f64 {
    let idx: Vec<usize> = (0..16).collect();
    let (x, y) = data.batch(&idx, &Device::Cpu).unwrap();
    let x0 = x.affine(2.0, -1.0).unwrap();
    let t: Vec<usize> = (0..16).map(|i| i * 62 + 3).collect();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(17);
    let noise: Vec<f32> = (0..x0.elem_count()).map(|_| rand::Rng::sample(&mut rng, rand_distr::StandardNormal)).collect();
    let noise = Tensor::from_vec(noise, x0.shape(), &Device::Cpu).unwrap();
    let terms = batch_losses(net, &cfg.diffusion().unwrap(), true, &x0, &t, &noise, Some(&y)).unwrap();
    terms.loss.mean_all().unwrap().to_scalar::<f32>().unwrap() as f64
}

#[test]
fn training_lowers_the_loss() {
    let data = two_class_images(64, 1);
    let mut cfg = tiny_config();
    cfg.iterations = 30;
    let untrained = TrainableUNet::new(&cfg.model, cfg.seed, &Device::Cpu).unwrap();
    let before: f64 = fixed_batch_loss(&untrained, &cfg, &data);
    let dir = tempfile::tempdir().unwrap();
    let (net, _, report) = run(&cfg, &data, dir.path(), false, None);
    assert!(report.finished && report.steps == 30, "{report:?}");
    let after = fixed_batch_loss(&net, &cfg, &data);
    let log = metrics(dir.path());
    let train: Vec<f64> = log.iter().filter_map(|r| r.get("loss").and_then(|v| v.as_f64())).collect();
    assert_eq!(train.len(), 30);
    assert!(log.iter().all(|r| r.get("mse").is_some() && r.get("vb").is_some()));
    let first = train[..5].iter().sum::<f64>() / 5.0;
    let last = train[25..].iter().sum::<f64>() / 5.0;
    println!("train loss {first:.4} (first 5) -> {last:.4} (last 5); fixed-batch loss {before:.4} -> {after:.4}");
    assert!(last < 0.8 * first, "train loss did not fall: {train:?}");
    assert!(after < 0.8 * before, "fixed-batch loss did not fall: {before} -> {after}");
}

#[test]
fn resume_continues_bit_for_bit() {
    let data = two_class_images(40, 3);
    let cfg = tiny_config(); // 6 iterations of 16 over 2 full batches per epoch
    let whole = tempfile::tempdir().unwrap();
    let (straight, straight_ema, r) = run(&cfg, &data, whole.path(), false, None);
    assert!(r.finished && r.steps == 6);
    // Interrupted after 3 iterations (mid-epoch: epoch 1, batch 1), then resumed by a fresh start.
    let parts = tempfile::tempdir().unwrap();
    let (_, _, r) = run(&cfg, &data, parts.path(), false, Some(3));
    assert!(!r.finished && r.steps == 3);
    let (resumed, resumed_ema, r) = run(&cfg, &data, parts.path(), true, None);
    assert!(r.finished && r.steps == 6);
    assert_eq!(weights(&straight), weights(&resumed), "resumed run's weights differ from the uninterrupted one's");
    assert_eq!(ema_weights(&straight_ema), ema_weights(&resumed_ema), "resumed run's EMA differs");
    assert_ne!(ema_weights(&straight_ema), weights(&straight), "the EMA is not the weights");
    let (a, b) = (metrics(whole.path()), metrics(parts.path()));
    let strip = |v: &[serde_json::Value]| -> Vec<(u64, f64, f64)> {
        v.iter().map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap(), r["vb"].as_f64().unwrap())).collect()
    };
    assert_eq!(strip(&a), strip(&b));
    assert_eq!(strip(&b).iter().map(|s| s.0).collect::<Vec<_>>(), (1..=6).collect::<Vec<u64>>());
    // Another setting is refused on resume, naming the field.
    let mut other = cfg.clone();
    other.ema_rate = 0.99;
    let work = WorkDir::open(parts.path(), CHECKPOINT_KIND, true).unwrap();
    let net = TrainableUNet::new(&other.model, other.seed, &Device::Cpu).unwrap();
    let mut ema = Ema::new(other.ema_rate, &net.parameters()).unwrap();
    let opts = RunOptions { device: Device::Cpu, work_dir: &work, resume: true, checkpoint_every: 10, log_every: 1, test: None, stop_after: None, time_limit: None, progress: false };
    let err = train_diffusion(&other, &data, &net, &mut ema, &opts).err().unwrap().to_string();
    assert!(err.contains("ema_rate: checkpoint"), "{err}");
}

/// A time limit stops the run at an iteration boundary with a checkpoint that --resume continues
/// (a limit of zero stops before the first iteration).
#[test]
fn time_limit_stops_with_a_checkpoint() {
    let data = two_class_images(40, 3);
    let cfg = tiny_config();
    let dir = tempfile::tempdir().unwrap();
    let work = WorkDir::open(dir.path(), CHECKPOINT_KIND, false).unwrap();
    let net = TrainableUNet::new(&cfg.model, cfg.seed, &Device::Cpu).unwrap();
    let mut ema = Ema::new(cfg.ema_rate, &net.parameters()).unwrap();
    let opts = RunOptions { device: Device::Cpu, work_dir: &work, resume: false, checkpoint_every: 1000, log_every: 1, test: None, stop_after: None, time_limit: Some(Duration::ZERO), progress: false };
    let report = train_diffusion(&cfg, &data, &net, &mut ema, &opts).unwrap();
    assert!(!report.finished && report.steps == 0, "{report:?}");
    assert!(work.checkpoint_path().exists());
    let (_, _, report) = run(&cfg, &data, dir.path(), true, None);
    assert!(report.finished && report.steps == 6, "{report:?}");
}

/// A warm start sets every weight from a written UNet file (here a stopped run's EMA), and refuses
/// a file made for another network, naming the field that differs.
#[test]
fn warm_start_takes_a_written_unet() {
    let data = two_class_images(40, 3);
    let cfg = tiny_config();
    let dir = tempfile::tempdir().unwrap();
    let (_, ema, _) = run(&cfg, &data, dir.path(), false, Some(2));
    let path = dir.path().join("u.safetensors");
    save_unet(&path, &cfg, &ema, &["top".into(), "bottom".into()], None, "test".into(), false).unwrap();
    let fresh = TrainableUNet::new(&cfg.model, 99, &Device::Cpu).unwrap();
    assert_ne!(weights(&fresh), ema_weights(&ema));
    warm_start(&fresh, &cfg, &path, &Device::Cpu).unwrap();
    assert_eq!(weights(&fresh), ema_weights(&ema));
    let mut wider = cfg.clone();
    wider.model.model_channels = 64;
    let net = TrainableUNet::new(&wider.model, 0, &Device::Cpu).unwrap();
    let err = warm_start(&net, &wider, &path, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("model.model_channels: checkpoint 32 vs now 64"), "{err}");
}

/// The default CIFAR-10 UNet: its f16 weights file fits in 40 MB; guided-diffusion's
/// initialization (zero_module layers at 0, GroupNorm affine 1/0, label embedding ~ N(0, 1),
/// convolution bounds 1/sqrt(fan_in)).
#[test]
fn default_cifar_unet_is_small_and_initialized_as_guided_diffusion() {
    let net = TrainableUNet::new(&cifar10_unet(Some(10)), 3, &Device::Cpu).unwrap();
    let count = net.parameter_count();
    println!("default CIFAR-10 UNet: {count} parameters, {:.1} MB in f16", 2.0 * count as f64 / 1e6);
    assert!(2 * count <= 40_000_000, "{count} parameters");
    let values = |name: &str| -> Vec<f32> {
        let p = net.parameters().into_iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no `{name}`")).1;
        p.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    };
    for zero in ["input_blocks.1.0.out_layers.3.weight", "output_blocks.0.0.out_layers.3.bias", "middle_block.1.proj_out.weight", "out.2.weight", "out.2.bias"] {
        assert!(values(zero).iter().all(|&v| v == 0.0), "{zero} is not zero");
    }
    assert!(values("out.0.weight").iter().all(|&v| v == 1.0));
    assert!(values("out.0.bias").iter().all(|&v| v == 0.0));
    let emb = values("label_emb.weight");
    let std = (emb.iter().map(|v| v * v).sum::<f32>() / emb.len() as f32).sqrt();
    assert!((std - 1.0).abs() < 0.05, "label embedding std {std}");
    let v = values("input_blocks.0.0.weight");
    let bound = 1.0 / 27f32.sqrt();
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(max <= bound && max > 0.8 * bound, "max |v| {max} vs bound {bound}");
}

#[test]
fn saved_file_is_the_ema_as_an_adm_unet() {
    let cfg = tiny_config();
    let net = TrainableUNet::new(&cfg.model, 1, &Device::Cpu).unwrap();
    let params = net.parameters();
    let mut ema = Ema::new(0.5, &params).unwrap();
    // Move the weights away from the EMA so the file's origin shows.
    for (_, v) in &params {
        v.set(&(v.as_tensor() + 0.01).unwrap()).unwrap();
    }
    ema.update(&params).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for half in [false, true] {
        let path = dir.path().join(format!("u{half}.safetensors"));
        let classes = vec!["top".to_string(), "bottom".to_string()];
        save_unet(&path, &cfg, &ema, &classes, Some("toy".into()), "test".into(), half).unwrap();
        let ck = bigroc::weights::Checkpoint::load(path.to_str().unwrap(), &Device::Cpu).unwrap();
        for (name, t) in &ema.tensors {
            let stored = ck.tensors[name].to_dtype(DType::F32).unwrap();
            let e = rel_err(&stored, t).unwrap();
            assert!(if half { e < 1e-3 } else { e == 0.0 }, "{name}: {e}");
        }
        let loaded = DiffusionModel::from_checkpoint(&ck, DType::F32).unwrap();
        assert_eq!(loaded.config(), &cfg.model);
        assert!(loaded.diffusion.learn_sigma);
        assert_eq!(loaded.diffusion.steps, 1000);
        assert_eq!(loaded.info.classes, classes);
    }
}

// ---------------------------------------------------------------------------------------------
// end to end through the binary

fn bigroc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bigroc")).args(args).env("BIGROC_LOG", "warn").env("RUST_BACKTRACE", "0").output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = bigroc(args);
    assert!(out.status.success(), "bigroc {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn cli_trains_a_unet_that_sample_uses() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("data");
    for c in 0..3u8 {
        let folder = data.join(format!("class{c}"));
        std::fs::create_dir_all(&folder).unwrap();
        for i in 0..2u8 {
            let img = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([c * 80, (x as u8) * 30 + i, (y as u8) * 30]));
            img.save(folder.join(format!("{i}.png"))).unwrap();
        }
    }
    let unet = d.join("unet.safetensors");
    let args = [
        "train", "diffusion", "--data", data.to_str().unwrap(), "--output", unet.to_str().unwrap(), "--iterations", "2",
        "--batch-size", "6", "--num-channels", "32", "--num-res-blocks", "1", "--channel-mult", "1,1",
        "--attention-resolutions", "4", "--num-head-channels", "32", "--device", "cpu", "--log-every", "1", "--half",
    ];
    let stdout = ok(&args);
    assert!(stdout.contains("wrote"), "{stdout}");
    let work = d.join("unet.safetensors.train");
    assert!(work.join("checkpoint.safetensors").exists());
    assert_eq!(metrics(&work).len(), 2);
    let loaded = DiffusionModel::load(unet.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(loaded.num_classes(), Some(3));
    assert!(loaded.diffusion.learn_sigma);
    assert_eq!(loaded.info.flags["ema_rate"], 0.9999);
    assert_eq!(loaded.info.flags["lr"], 1e-4);
    assert_eq!(loaded.info.flags["optimizer"]["weight_decay"], 0.0);
    // A second run into the same work directory is refused without --resume.
    let again = bigroc(&args);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
    // A run out of time writes the weights so far (saying so) and a checkpoint; another run can
    // start from those weights.
    let stopped = d.join("stopped.safetensors");
    let mut timed = args.to_vec();
    timed[5] = stopped.to_str().unwrap();
    timed.extend(["--stop-after-minutes", "0"]);
    let out = bigroc(&timed);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stderr).contains("stopped after 0 iterations"));
    let partial = DiffusionModel::load(stopped.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    assert!(partial.info.provenance.unwrap().contains("stopped after 0 iterations (not finished)"));
    assert!(d.join("stopped.safetensors.train/checkpoint.safetensors").exists());
    let warm = d.join("warm.safetensors");
    let mut continued = args.to_vec();
    continued[5] = warm.to_str().unwrap();
    continued.extend(["--init-from", unet.to_str().unwrap()]);
    ok(&continued);
    let warm_file = DiffusionModel::load(warm.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    assert!(warm_file.info.provenance.unwrap().contains("warm-started from"));

    let out = d.join("s.npz");
    ok(&[
        "sample", "--model", unet.to_str().unwrap(), "--guidance", "none", "--num", "2", "--timestep-respacing", "4",
        "--device", "cpu", "--output", out.to_str().unwrap(),
    ]);
    assert_eq!(bigroc::data::npz::read_samples(&out).unwrap().images.dims(), &[2, 8, 8, 3]);
}
