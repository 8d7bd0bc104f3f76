//! `bigroc convert --from guided-diffusion` and `bigroc sample` end to end through the binary, on
//! the tiny random-weight networks of `adm_sampler_models` (saved by the fixture script also as
//! original-format `.pt` checkpoints): conversion by the scripts' flags, a guided DDIM run from a
//! given x_T that reproduces guided-diffusion's trajectory, reproducible seeds independent of the
//! batch size, resuming, shards, folders, grids, trajectories and one-line errors.

mod common;
use common::{bigroc, fails, ok};

mod adm_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use adm_support::{fixture_path, Fixture};
use bigroc::adm::{DiffusionModel, TimeClassifier, UNetFileConfig};
use bigroc::data::npz;
use bigroc::weights::Checkpoint;
use bigroc_models::adm::{EncoderUNetConfig, UNetConfig};
use candle_core::{DType, Device, Tensor};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const UNET_FLAGS: &[&str] = &[
    "--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,1",
    "--attention_resolutions", "4", "--num_heads", "4", "--learn_sigma", "True", "--class_cond", "True",
    "--num_classes", "10", "--rescale_timesteps", "True", "--diffusion_steps", "1000", "--noise_schedule",
    "linear", "--use_fp16", "False",
];
const CLASSIFIER_FLAGS: &[&str] = &[
    "--image_size", "8", "--classifier_width", "32", "--classifier_depth", "1",
    "--classifier_attention_resolutions", "4", "--classifier_channel_mult", "1,2", "--num_classes", "10",
    "--classifier_pool", "attention", "--classifier_resblock_updown", "True",
    "--classifier_use_scale_shift_norm", "True",
];

/// Converts the fixture checkpoints into `dir`; returns (unet, classifier) paths.
fn convert_both(dir: &Path) -> (PathBuf, PathBuf) {
    let unet = dir.join("unet.safetensors");
    let clf = dir.join("clf.safetensors");
    let pt = fixture_path("adm_improved_unet").with_extension("pt");
    let mut args = vec!["convert", "--from", "guided-diffusion", s(&pt), "--kind", "unet", "--output", s(&unet)];
    args.extend_from_slice(UNET_FLAGS);
    let msg = ok(&args);
    assert!(msg.contains("diffusion UNet"), "{msg}");
    let pt = fixture_path("adm_classifier").with_extension("pt");
    let mut args = vec![
        "convert", "--from", "guided-diffusion", s(&pt), "--kind", "classifier", "--training", "robust",
        "--output", s(&clf),
    ];
    args.extend_from_slice(CLASSIFIER_FLAGS);
    ok(&args);
    (unet, clf)
}

#[test]
fn convert_by_script_flags_keeps_every_tensor_and_records_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let (unet, clf) = convert_both(dir.path());
    let fx = Fixture::load("adm_sampler_models").unwrap();
    let want_unet: UNetConfig = fx.config_of("improved").unwrap();
    let want_clf: EncoderUNetConfig = fx.config_of("classifier").unwrap();

    let ck = Checkpoint::load(s(&unet), &Device::Cpu).unwrap();
    let cfg: UNetFileConfig = ck.config().unwrap();
    assert_eq!(cfg.model, want_unet);
    assert!(cfg.diffusion.learn_sigma && cfg.diffusion.rescale_timesteps && cfg.diffusion.steps == 1000);
    for (prefix, ck) in [("improved.", &ck), ("classifier.", &Checkpoint::load(s(&clf), &Device::Cpu).unwrap())] {
        let n = fx.tensors.keys().filter(|k| k.starts_with(prefix)).count();
        assert_eq!(ck.tensors.len(), n, "{prefix}: tensor count");
        for (k, t) in &ck.tensors {
            let want = fx.get(&format!("{prefix}{k}")).unwrap().to_dtype(DType::F32).unwrap();
            assert_eq!(t.dtype(), DType::F32);
            let same = t.eq(&want).unwrap().to_dtype(DType::F32).unwrap().min_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(same, 1.0, "{prefix}{k} differs");
        }
    }
    let model = DiffusionModel::load(s(&unet), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(model.info.classes.len(), 10);
    assert_eq!(model.info.classes[0], "airplane");
    let classifier = TimeClassifier::load(s(&clf), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(classifier.model.config(), &want_clf);
    assert_eq!(classifier.info.training.as_deref(), Some("robust"));
    println!("converted by flags: every UNet ({}) and classifier tensor identical to the reference's", ck.tensors.len());
}

#[test]
fn convert_errors_name_the_key_or_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("u.safetensors");
    let pt = fixture_path("adm_improved_unet").with_extension("pt");
    let base = ["convert", "--from", "guided-diffusion", s(&pt), "--kind", "unet", "--output", s(&out)];
    // the scripts' default class count (1000) does not fit this CIFAR-sized label embedding
    let mut args = base.to_vec();
    args.extend(UNET_FLAGS.iter().take(UNET_FLAGS.len() - 10));
    args.extend(["--rescale_timesteps", "True"]);
    let err = fails(&args);
    assert!(err.contains("label_emb.weight") && err.contains("--num_classes 10"), "{err}");
    // a wrong width names the first mis-shaped key
    let mut args = base.to_vec();
    args.extend_from_slice(UNET_FLAGS);
    args.extend(["--num_channels", "64"]);
    let err = fails(&args);
    assert!(err.contains("time_embed.0.weight") && err.contains("adm_improved_unet.pt"), "{err}");
    // one attention level too many: a key the checkpoint lacks
    let mut args = base.to_vec();
    args.extend_from_slice(UNET_FLAGS);
    args.extend(["--attention_resolutions", "8,4"]);
    let err = fails(&args);
    assert!(err.contains("is missing"), "{err}");
    let err = fails(&["convert", "--from", "guided-diffusion", s(&pt), "--output", s(&out)]);
    assert!(err.contains("--kind"), "{err}");
    let err = fails(&["convert", "--from", "guided-diffusion", s(&pt), "--kind", "unet", "--preset", "adm512", "--output", s(&out)]);
    assert!(err.contains("adm512"), "{err}");
    let mut args = base.to_vec();
    args.extend_from_slice(UNET_FLAGS);
    args.extend(["--class_cond", "maybe"]);
    let out = bigroc(&args);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("boolean value expected"));
    assert!(!dir.path().join("u.safetensors").exists());
}

/// x_T and labels of the DDIM fixture as an init-noise file.
fn init_noise(dir: &Path, fx: &Fixture) -> PathBuf {
    let path = dir.join("x_T.npz");
    npz::write(&path, &[("arr_0", &fx.get("x_T").unwrap())]).unwrap();
    path
}

#[test]
fn guided_ddim_from_given_noise_reproduces_the_reference_trajectory() {
    let dir = tempfile::tempdir().unwrap();
    let (unet, clf) = convert_both(dir.path());
    let fx = Fixture::load("adm_traj_ddim_eta0").unwrap();
    assert_eq!(fx.config["model"], "improved");
    let x_t = init_noise(dir.path(), &fx);
    let out = dir.path().join("ddim.npz");
    let traj = dir.path().join("traj.npz");
    ok(&[
        "sample", "--model", s(&unet), "--classifier", s(&clf), "--guidance", "robust", "--scale", "2.0",
        "--num", "2", "--batch-size", "2", "--classes", "4,9", "--timestep-respacing", "10,0,0",
        "--sampler", "ddim", "--eta", "0", "--init-noise", s(&x_t), "--output", s(&out),
        "--save-trajectory", s(&traj), "--trajectory-steps", "10",
    ]);
    let set = npz::read_samples(&out).unwrap();
    assert_eq!(set.labels, Some(vec![4, 9]));
    // guided-diffusion's conversion of the reference's final sample
    let samples = fx.get("samples").unwrap();
    let last = samples.get(samples.dim(0).unwrap() - 1).unwrap();
    let want = bigroc::diffusion::job::to_u8_nhwc_signed(&last).unwrap();
    let ours = set.images.to_dtype(DType::F32).unwrap();
    let diff = (ours - want.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap();
    let max = diff.max_all().unwrap().to_scalar::<f32>().unwrap();
    let off = diff.gt(0f32).unwrap().to_dtype(DType::F32).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    println!("CLI DDIM run vs reference: {off} of {} pixel values differ, by at most {max} level", diff.elem_count());
    // values within f32 rounding of a level boundary may land one level apart
    assert!(max <= 1.0 && off <= 0.002 * diff.elem_count() as f32);
    // the trajectory holds the reference's predicted x0 at every step
    let t = npz::read_all(&traj).unwrap();
    assert_eq!(t["arr_0"].dims(), &[10, 2, 8, 8, 3]);
    let want_x0 = bigroc::diffusion::job::to_u8_nhwc_signed(&fx.get("pred_xstarts").unwrap().flatten_to(1).unwrap()).unwrap();
    let ours_x0 = t["arr_0"].flatten_to(1).unwrap().to_dtype(DType::F32).unwrap();
    let max = (ours_x0 - want_x0.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(max <= 1.0, "trajectory differs by {max} levels");
    assert_eq!(t["t"].to_vec1::<i64>().unwrap(), vec![333, 296, 259, 222, 185, 148, 111, 74, 37, 0]);
}

/// Runs a small ancestral sampling job; returns the output images as u8 values.
fn sample_npz(unet: &Path, clf: &Path, out: &Path, extra: &[&str]) -> Vec<u8> {
    let mut args = vec![
        "sample", "--model", s(unet), "--classifier", s(clf), "--num", "5", "--timestep-respacing", "6",
        "--output", s(out),
    ];
    args.extend_from_slice(extra);
    ok(&args);
    let set = npz::read_samples(out).unwrap();
    assert_eq!(set.labels, Some(vec![0, 1, 2, 3, 4]));
    set.images.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

#[test]
fn seeds_reproduce_across_batch_sizes_and_shards_merge_to_the_whole_run() {
    let dir = tempfile::tempdir().unwrap();
    let (unet, clf) = convert_both(dir.path());
    let d = dir.path();
    let whole = sample_npz(&unet, &clf, &d.join("a.npz"), &["--batch-size", "2", "--seed", "11"]);
    let other_batching = sample_npz(&unet, &clf, &d.join("b.npz"), &["--batch-size", "5", "--seed", "11"]);
    let same = whole.iter().zip(&other_batching).filter(|(a, b)| a == b).count();
    println!("batch 2 vs batch 5: {same} of {} pixel values identical", whole.len());
    assert!(same as f64 >= 0.999 * whole.len() as f64);
    let other_seed = sample_npz(&unet, &clf, &d.join("c.npz"), &["--batch-size", "2", "--seed", "12"]);
    assert!(whole.iter().zip(&other_seed).filter(|(a, b)| a != b).count() > whole.len() / 2);
    // shards of the batches, merged, are the whole run
    for k in 0..2 {
        let shard = format!("{k}/2");
        let out = d.join(format!("shard{k}.npz"));
        ok(&[
            "sample", "--model", s(&unet), "--classifier", s(&clf), "--num", "5", "--timestep-respacing", "6",
            "--seed", "11", "--batch-size", "2", "--shard", &shard, "--output", s(&out),
        ]);
    }
    ok(&["merge", "--output", s(&d.join("merged.npz")), s(&d.join("shard1.npz")), s(&d.join("shard0.npz"))]);
    let merged = npz::read_samples(&d.join("merged.npz")).unwrap();
    assert_eq!(merged.images.flatten_all().unwrap().to_vec1::<u8>().unwrap(), whole);
    // a finished output is not overwritten
    let err = fails(&[
        "sample", "--model", s(&unet), "--classifier", s(&clf), "--num", "5", "--timestep-respacing", "6",
        "--seed", "11", "--batch-size", "2", "--output", s(&d.join("a.npz")),
    ]);
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn interrupted_sampling_resumes_to_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    let (unet, clf) = convert_both(dir.path());
    let d = dir.path();
    let args = |out: &Path| -> Vec<String> {
        [
            "sample", "--model", s(&unet), "--classifier", s(&clf), "--num", "12", "--batch-size", "1",
            "--timestep-respacing", "8", "--output", s(out),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let reference = d.join("ref.npz");
    ok(&args(&reference).iter().map(String::as_str).collect::<Vec<_>>());
    let out = d.join("out.npz");
    let partial = d.join("out.npz.partial");
    let mut child = Command::new(env!("CARGO_BIN_EXE_bigroc")).args(args(&out)).env("BIGROC_LOG", "warn").spawn().unwrap();
    while !partial.join("chunk-000002.npz").exists() {
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be interrupted");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.exists(), "no final output after an interruption");
    let mut other = args(&out);
    let at = other.len() - 3;
    other[at] = "9".into(); // another respacing must not mix with the interrupted run
    let err = fails(&other.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("timestep_respacing"), "{err}");
    let msg = ok(&args(&out).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(msg.contains("12 images"), "{msg}");
    let a = npz::read_samples(&out).unwrap().images.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let b = npz::read_samples(&reference).unwrap().images.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    assert_eq!(a, b);
}

#[test]
fn folder_output_grid_png_trajectory_and_unguided_sampling() {
    let dir = tempfile::tempdir().unwrap();
    let (unet, clf) = convert_both(dir.path());
    let d = dir.path();
    let out = d.join("samples");
    ok(&[
        "sample", "--model", s(&unet), "--classifier", s(&clf), "--guidance", "vanilla", "--num", "3",
        "--classes", "cat,dog", "--timestep-respacing", "ddim4", "--eta", "0.5", "--output", s(&out),
        "--grid", s(&d.join("grid.png")), "--save-trajectory", s(&d.join("traj.png")), "--trajectory-steps", "3",
    ]);
    for rel in ["cat/000000.png", "dog/000001.png", "cat/000002.png"] {
        assert!(out.join(rel).is_file(), "{rel} missing");
    }
    let grid = image::open(d.join("grid.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (2 * 8 + 2, 2 * 8 + 2));
    let traj = image::open(d.join("traj.png")).unwrap();
    assert_eq!((traj.width(), traj.height()), (4 * 8 + 3 * 2, 3 * 8 + 2 * 2));
    // no classifier: class-conditional sampling alone
    let plain = d.join("plain.npz");
    ok(&["sample", "--model", s(&unet), "--guidance", "none", "--num", "2", "--timestep-respacing", "4", "--output", s(&plain)]);
    assert_eq!(npz::read_samples(&plain).unwrap().images.dims(), &[2, 8, 8, 3]);
}

#[test]
fn bad_sampling_requests_get_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (unet, clf) = convert_both(dir.path());
    let d = dir.path();
    let o = d.join("o.npz");
    let base = ["sample", "--model", s(&unet), "--classifier", s(&clf), "--output", s(&o)];
    let with = |extra: &[&str]| -> String {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        fails(&a)
    };
    assert!(with(&["--classes", "wolf"]).contains("`wolf`"));
    assert!(with(&["--classes", "10"]).contains("out of range"));
    assert!(with(&["--timestep-respacing", "ddim999"]).contains("ddim999"));
    assert!(with(&["--timestep-respacing", "2000"]).contains("2000"));
    assert!(with(&["--sampler", "ancestral", "--eta", "0.5"]).contains("--eta"));
    let bad = d.join("bad.npz");
    npz::write(&bad, &[("arr_0", &Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap())]).unwrap();
    assert!(with(&["--num", "2", "--init-noise", s(&bad)]).contains("bad.npz"));
    // the classifier where the model belongs, and a missing file
    let err = fails(&["sample", "--model", s(&clf), "--classifier", s(&clf), "--output", s(&o)]);
    assert!(err.contains("adm-classifier") && err.contains("adm-unet"), "{err}");
    let err = fails(&["sample", "--model", s(&d.join("none.safetensors")), "--guidance", "none", "--output", s(&o)]);
    assert!(err.contains("none.safetensors"), "{err}");
    let err = fails(&["sample", "--model", s(&unet), "--guidance", "none", "--classifier", s(&clf), "--output", s(&o)]);
    assert!(err.contains("--guidance none"), "{err}");
    assert!(!o.exists());
}
