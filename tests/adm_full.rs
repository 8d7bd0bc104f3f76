//! `convert` of full-size ADM checkpoints in the original format, for every preset (ImageNet 128
//! and 256 diffusion models and classifiers, the robust-guidance paper's CIFAR-10 pair), with
//! random weights: the converted networks give the reference's outputs (and, for classifiers,
//! input gradients) on one input. The checkpoints take several GB, so they are never committed:
//! `cargo xtask fixtures --only adm --full target/fixtures-full` (or
//! `xtask/reference/adm_fixtures.py --skip-small --full DIR`) writes them, and this test skips,
//! saying so, when they are absent. Set BIGROC_FULL_FIXTURES to look elsewhere.

mod adm_support;

use std::path::PathBuf;

use adm_support::rel_err;
use bigroc::adm::{import_classifier, import_unet, preset, AdmInfo, DiffusionModel, TimeClassifier, UNetFileConfig};
use bigroc::weights::Checkpoint;
use candle_core::{DType, Device};

fn full_dir() -> PathBuf {
    std::env::var_os("BIGROC_FULL_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/fixtures-full")))
}

#[test]
fn full_size_adm_checkpoints_convert_exactly() {
    let dir = full_dir();
    for family in ["cifar10", "adm128", "adm256"] {
        let p = preset(family).unwrap();
        for kind in ["diffusion", "classifier"] {
            let name = format!("{family}_{kind}");
            let checkpoint = dir.join(format!("{name}.pt"));
            let check = dir.join(format!("{name}_check.safetensors"));
            if !checkpoint.is_file() || !check.is_file() {
                println!(
                    "SKIPPED: {} absent; make it with `cargo xtask fixtures --only adm --full {}`",
                    checkpoint.display(),
                    dir.display()
                );
                continue;
            }
            let want = candle_core::safetensors::load(&check, &Device::Cpu).unwrap();
            let (x, t) = (&want["input"], &want["timesteps"]);
            let started = std::time::Instant::now();
            if kind == "diffusion" {
                let config = UNetFileConfig { model: p.unet().unwrap(), diffusion: p.diffusion.clone() };
                let (header, tensors) = import_unet(&checkpoint, &config, AdmInfo::default()).unwrap();
                let ck = Checkpoint { path: checkpoint.clone(), header, tensors };
                let model = DiffusionModel::from_checkpoint(&ck, DType::F32).unwrap();
                let out = model.unet.forward(x, t, Some(&want["y"])).unwrap();
                let err = rel_err(&out, &want["output"]).unwrap();
                println!("{name}: output rel err {err:.2e} ({:.1} s)", started.elapsed().as_secs_f64());
                assert!(err <= 1e-4, "{name}: output rel err {err}");
            } else {
                let config = p.classifier().unwrap();
                let (header, tensors) = import_classifier(&checkpoint, &config, AdmInfo::default()).unwrap();
                let ck = Checkpoint { path: checkpoint.clone(), header, tensors };
                let clf = TimeClassifier::from_checkpoint(&ck, DType::F32).unwrap();
                let logits = clf.model.forward(x, t).unwrap();
                let err = rel_err(&logits, &want["output"]).unwrap();
                let grad = clf.model.log_prob_grad(x, t, &want["y"]).unwrap();
                let grad_err = rel_err(&grad, &want["grad"]).unwrap();
                println!(
                    "{name}: logits rel err {err:.2e}, d log p(y|x)/dx rel err {grad_err:.2e} ({:.1} s)",
                    started.elapsed().as_secs_f64()
                );
                assert!(err <= 1e-4 && grad_err <= 1e-4, "{name}: rel errs {err}, {grad_err}");
            }
        }
    }
}
