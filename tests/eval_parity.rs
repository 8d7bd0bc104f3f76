//! Parity of `bigroc::eval` with the Python evaluators, on fixtures made by
//! `xtask/reference/eval_fixtures.py` (see that script for the reference of each number).
//!
//! Relative errors are `max|a - b| / max|b|` (max-abs relative error) unless stated otherwise.
//! Tests that need the Inception network read it from `../shared` and skip with a message when it
//! is absent; no network weights are committed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bigroc::eval::fid::{frechet_distance, FidStats};
use bigroc::eval::images::ImageSet;
use bigroc::eval::inception_score::inception_score;
use bigroc::eval::network::{read_inception_tensors, FidInception, WeightsFormat};
use bigroc::eval::precision_recall::{knn_sq_radii, precision_recall, precision_recall_cached};
use bigroc::eval::stats_file::{read_stats, write_stats};
use bigroc::eval::torch_archive::read_torch_tensors;
use bigroc::eval::FeatureSet;
use candle_core::{DType, Device, Tensor};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn fixture(name: &str) -> HashMap<String, Tensor> {
    let path = Path::new(ROOT).join("tests/fixtures").join(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

fn fixture_config(name: &str) -> serde_json::Value {
    let bytes = std::fs::read(Path::new(ROOT).join("tests/fixtures").join(name)).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let cfg = meta.metadata().as_ref().unwrap().get("config").unwrap();
    serde_json::from_str(cfg).unwrap()
}

fn shared(rel: &str) -> Option<PathBuf> {
    let p = Path::new(ROOT).join("../shared").join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "SKIPPED: {} is absent (the shared data of this workplace)",
            p.display()
        );
        None
    }
}

fn max_rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let a = a
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = b
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a.len(), b.len(), "shapes differ");
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(f32::MIN_POSITIVE, f32::max);
    diff / scale
}

/// Features of the TorchScript archive, run by candle, against torch.jit on CPU: CIFAR-10 images
/// (32x32 upsampled) and random images of other sizes (non-square upsampling, no resampling at
/// 299x299, downsampling from 340x410).
#[test]
fn inception_torchscript_features_match_torch() {
    let Some(path) = shared("models/inception-2015-12-05.pt") else {
        return;
    };
    let net = FidInception::load(&path, &Device::Cpu).unwrap();
    assert_eq!(net.format, WeightsFormat::TorchScript);
    assert!(
        !net.has_logits(),
        "the TorchScript archive has no classifier"
    );
    let fx = fixture("eval_inception_torchscript.safetensors");
    let groups = fixture_config("eval_inception_torchscript.safetensors")["groups"].clone();
    for group in groups.as_array().unwrap() {
        let group = group.as_str().unwrap();
        let out = net.forward_images(&fx[&format!("images.{group}")]).unwrap();
        let err = max_rel_err(&out.pool, &fx[&format!("features.{group}")]);
        println!("torchscript features {group}: max rel err {err:.3e}");
        assert!(err <= 1e-4, "{group}: {err}");
    }
}

/// The CIFAR-10 JPEGs of the shared tar decoded by the `image` crate against PIL's pixels (what the
/// Python evaluators see). Decoders may round chroma upsampling differently; the difference is
/// measured and bounded, and reported here.
#[test]
fn cifar_jpeg_decoding_close_to_pil() {
    let Some(tar) = shared("data/cifar10/test.tar") else {
        return;
    };
    let fx = fixture("eval_inception_torchscript.safetensors");
    let names =
        fixture_config("eval_inception_torchscript.safetensors")["cifar_tar_members"].clone();
    let names: Vec<String> = names
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let pil = fx["images.cifar"].to_dtype(DType::F32).unwrap();
    let mut archive = tar::Archive::new(std::fs::File::open(&tar).unwrap());
    let mut ours = vec![None; names.len()];
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().to_string();
        if let Some(i) = names.iter().position(|n| *n == name) {
            let mut bytes = vec![];
            std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
            let im = bigroc::eval::images::decode_rgb(&bytes, &name).unwrap();
            let t = Tensor::from_vec(im.data, (im.height, im.width, 3), &Device::Cpu).unwrap();
            ours[i] = Some(t.permute((2, 0, 1)).unwrap().to_dtype(DType::F32).unwrap());
        }
    }
    let ours: Vec<Tensor> = ours
        .into_iter()
        .map(|t| t.expect("member missing from the tar"))
        .collect();
    let ours = Tensor::stack(&ours, 0).unwrap();
    let diff = (ours - &pil).unwrap().abs().unwrap();
    let max = diff
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let mean = diff.mean_all().unwrap().to_scalar::<f32>().unwrap();
    println!("JPEG decode vs PIL: max abs diff {max} levels, mean {mean:.4}");
    assert!(
        max <= 8.0 && mean <= 1.0,
        "image crate decodes far from PIL: max {max}, mean {mean}"
    );
}

/// The same network in pytorch-fid's layout (torchvision names, batch-norm scales, a classifier,
/// pytorch-fid's input scaling), against pytorch-fid's own modules. Weights: the archive's tensors
/// (renamed by `torchscript_key_to_torchvision`) plus the committed random batch-norm scales and
/// the first 64 rows of the random 1008-way classifier.
#[test]
fn inception_pytorch_fid_layout_matches_pytorch_fid() {
    let Some(path) = shared("models/inception-2015-12-05.pt") else {
        return;
    };
    let (mut tensors, _) = read_inception_tensors(&path).unwrap();
    let fx = fixture("eval_inception_pytorch_fid.safetensors");
    for (k, v) in &fx {
        if let Some(name) = k.strip_prefix("weights.") {
            tensors.insert(name.to_string(), v.clone());
        }
    }
    let net = FidInception::from_tensors(tensors, WeightsFormat::Torchvision, &path, &Device::Cpu)
        .unwrap();
    assert_eq!(
        net.scaling,
        bigroc_models::inception::InputScaling::PytorchFid
    );
    let rows = fx["weights.fc.weight"].dim(0).unwrap();
    for group in ["cifar", "rand_45x61"] {
        let out = net.forward_images(&fx[&format!("images.{group}")]).unwrap();
        let err_pool = max_rel_err(&out.pool, &fx[&format!("pool.{group}")]);
        let expected_logits = fx[&format!("logits.{group}")].narrow(1, 0, rows).unwrap();
        let err_logits = max_rel_err(&out.logits.unwrap(), &expected_logits);
        println!(
            "pytorch-fid layout {group}: pool max rel err {err_pool:.3e}, logits {err_logits:.3e}"
        );
        assert!(
            err_pool <= 1e-4 && err_logits <= 1e-4,
            "{group}: {err_pool} {err_logits}"
        );
    }
}

/// Optional end to end: the full 95 MB pytorch-fid state dict written by the fixture script (legacy
/// `torch.save` format, as the published .pth) through the real loader, all 1008 logits.
#[test]
fn pytorch_fid_pth_end_to_end() {
    let path = Path::new(ROOT).join("target/reference/pt_inception_fixture_legacy.pth");
    if !path.exists() {
        eprintln!(
            "SKIPPED: {} is absent (run xtask/reference/eval_fixtures.py)",
            path.display()
        );
        return;
    }
    let net = FidInception::load(&path, &Device::Cpu).unwrap();
    assert_eq!(net.format, WeightsFormat::Torchvision);
    assert!(net.has_logits());
    let fx = fixture("eval_inception_pytorch_fid.safetensors");
    let out = net.forward_images(&fx["images.rand_45x61"]).unwrap();
    let err_pool = max_rel_err(&out.pool, &fx["pool.rand_45x61"]);
    let err_logits = max_rel_err(&out.logits.unwrap(), &fx["logits.rand_45x61"]);
    println!("pytorch-fid .pth end to end: pool max rel err {err_pool:.3e}, 1008 logits {err_logits:.3e}");
    assert!(err_pool <= 1e-4 && err_logits <= 1e-4);
}

/// The PyTorch file reader on a real pytorch-fid state-dict subset saved by `torch.save` in both
/// formats (zip and legacy), including an int64 `num_batches_tracked` and a non-contiguous view.
#[test]
fn pth_reader_zip_and_legacy() {
    let expected = fixture("eval_pth_subset.safetensors");
    for file in ["eval_pth_subset_zip.pth", "eval_pth_subset_legacy.pth"] {
        let got: HashMap<String, Tensor> =
            read_torch_tensors(&Path::new(ROOT).join("tests/fixtures").join(file))
                .unwrap()
                .into_iter()
                .collect();
        let mut names: Vec<_> = got.keys().cloned().collect();
        names.sort();
        let mut want: Vec<_> = expected.keys().cloned().collect();
        want.sort();
        assert_eq!(names, want, "{file}: tensor names");
        for (k, v) in &got {
            assert_eq!(v.dims(), expected[k].dims(), "{file}: {k} shape");
            let diff = (v.to_dtype(DType::F32).unwrap() - &expected[k])
                .unwrap()
                .abs()
                .unwrap();
            let max = diff
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(max, 0.0, "{file}: {k} values");
        }
        assert_eq!(
            got["Conv2d_1a_3x3.bn.num_batches_tracked"].dtype(),
            DType::I64
        );
        println!("{file}: {} tensors read exactly", got.len());
    }
}

/// FID on fixed features against pytorch-fid (scipy sqrtm) and torch-fidelity (eigvals), with
/// well-conditioned and singular (N < d) covariances.
#[test]
fn fid_matches_pytorch_fid() {
    let fx = fixture("eval_fid.safetensors");
    for case in ["full_rank", "singular"] {
        let stats = |k: &str| {
            let f = &fx[&format!("{case}.{k}")];
            FidStats::from_features(
                &f.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                f.dim(1).unwrap(),
            )
            .unwrap()
        };
        let got = frechet_distance(&stats("features1"), &stats("features2")).unwrap();
        let pf = fx[&format!("{case}.fid_pytorch_fid")]
            .to_vec1::<f64>()
            .unwrap()[0];
        let tf = fx[&format!("{case}.fid_torch_fidelity")]
            .to_vec1::<f64>()
            .unwrap()[0];
        println!(
            "FID {case}: ours {:.9}, pytorch-fid {pf:.9} (diff {:.2e}), torch-fidelity {tf:.9} (diff {:.2e})",
            got.fid,
            (got.fid - pf).abs(),
            (got.fid - tf).abs()
        );
        assert!((got.fid - pf).abs() <= 1e-3 && (got.fid - tf).abs() <= 1e-3);
    }
}

/// FID statistics: mean and covariance in f64 against numpy on a small exact example, and a file
/// round trip through the OpenAI-style `.npz` layout.
#[test]
fn stats_and_stats_file_round_trip() {
    // Three 2-d points: mean (1, 2), np.cov = [[1, -0.5], [-0.5, 1]].
    let f = [0f32, 3.0, 1.0, 1.0, 2.0, 2.0];
    let s = FidStats::from_features(&f, 2).unwrap();
    assert_eq!(s.mu, vec![1.0, 2.0]);
    let want = [1.0, -0.5, -0.5, 1.0];
    for (a, b) in s.sigma.iter().zip(want) {
        assert!((a - b).abs() < 1e-12, "{:?}", s.sigma);
    }
    let fx = fixture("eval_fid.safetensors");
    let feats = &fx["full_rank.features1"];
    // Pad to 2048-d (the file layout is for pool features).
    let feats = feats
        .pad_with_zeros(1, 0, 2048 - feats.dim(1).unwrap())
        .unwrap();
    let set = FeatureSet {
        pool: feats.flatten_all().unwrap().to_vec1().unwrap(),
        count: feats.dim(0).unwrap(),
        ..Default::default()
    };
    let stats = set.stats().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ref.npz");
    write_stats(&path, &stats, &set).unwrap();
    let back = read_stats(&path).unwrap();
    let bs = back.stats.unwrap();
    assert_eq!(bs.mu, stats.mu);
    assert_eq!(bs.sigma, stats.sigma);
    assert_eq!(back.features.unwrap().pool, set.pool);
    assert!(!back.has_images);
}

/// A stats file caches the reference's k-NN radii; precision/recall from them are those computed
/// from scratch, and a subset of the features does not keep them.
#[test]
fn stats_file_caches_knn_radii() {
    let fx = fixture("eval_precision_recall.safetensors");
    let (real, fake) = (&fx["real"], &fx["fake"]);
    let real = real.pad_with_zeros(1, 0, 2048 - real.dim(1).unwrap()).unwrap();
    let fake = fake.pad_with_zeros(1, 0, 2048 - fake.dim(1).unwrap()).unwrap();
    let set = FeatureSet {
        pool: real.flatten_all().unwrap().to_vec1().unwrap(),
        count: real.dim(0).unwrap(),
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ref.npz");
    write_stats(&path, &set.stats().unwrap(), &set).unwrap();
    let back = read_stats(&path).unwrap().features.unwrap();
    let radii = back.knn_sq_radii.clone().expect("radii cached");
    assert_eq!(radii, knn_sq_radii(&real, 3, 1024).unwrap());
    let cached = precision_recall_cached(&real, Some(&radii), &fake, 3, 1024).unwrap();
    assert_eq!(cached, precision_recall(&real, &fake, 3, 1024).unwrap());
    assert!(back.select("0:10".parse().unwrap()).knn_sq_radii.is_none());
    assert!(precision_recall_cached(&real, Some(&radii[1..]), &fake, 3, 1024).is_err());
}

/// Precision/recall with k = 3 against torch-fidelity 0.4.0 (and a float64 numpy transcription of
/// the paper, stored alongside): exact agreement of the counts is required.
#[test]
fn precision_recall_matches_torch_fidelity() {
    let fx = fixture("eval_precision_recall.safetensors");
    for block in [64, 1024] {
        let pr = precision_recall(&fx["real"], &fx["fake"], 3, block).unwrap();
        let p = fx["precision"].to_vec1::<f64>().unwrap()[0];
        let r = fx["recall"].to_vec1::<f64>().unwrap()[0];
        let pn = fx["precision_numpy_f64"]
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[0];
        println!(
            "precision {} (torch-fidelity {p}, numpy f64 {pn}), recall {} (torch-fidelity {r}), block {block}",
            pr.precision, pr.recall
        );
        // torch-fidelity returns float32 fractions.
        assert!((pr.precision - p).abs() < 1e-6 && (pr.recall - r).abs() < 1e-6);
    }
}

/// Inception Score (10 splits, no shuffle) against torch-fidelity 0.4.0.
#[test]
fn inception_score_matches_torch_fidelity() {
    let fx = fixture("eval_inception_score.safetensors");
    let logits = &fx["logits"];
    let is = inception_score(
        &logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        logits.dim(1).unwrap(),
        10,
    )
    .unwrap();
    let mean = fx["mean"].to_vec1::<f64>().unwrap()[0];
    let std = fx["std"].to_vec1::<f64>().unwrap()[0];
    println!(
        "IS {} +- {} (torch-fidelity {mean} +- {std})",
        is.mean, is.std
    );
    assert!((is.mean - mean).abs() / mean < 1e-9 && (is.std - std).abs() < 1e-9);
}

/// Errors name what is wrong.
#[test]
fn clear_errors() {
    let missing = Path::new("/nonexistent/inception.pt");
    let err = FidInception::load(missing, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("/nonexistent/inception.pt") && err.contains("--inception"),
        "{err}"
    );
    let bad = Path::new(ROOT).join("tests/fixtures/eval_pth_subset_zip.pth");
    let err = format!(
        "{:#}",
        FidInception::load(&bad, &Device::Cpu).err().unwrap()
    );
    assert!(
        err.contains("eval_pth_subset_zip.pth") && err.contains("not the FID Inception"),
        "{err}"
    );
    let err = ImageSet::open(Path::new(ROOT).join("Cargo.toml").as_path())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("Cargo.toml"), "{err}");
}
