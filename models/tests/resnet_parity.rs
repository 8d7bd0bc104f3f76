//! Parity of `bigroc_models::resnet` and `bigroc_models::ops` with the reference implementations
//! (robustness' CIFAR ResNets, torchvision's ImageNet ResNet, robustness' InputNormalize, PyTorch's
//! max_pool2d), using the fixtures written by `xtask/reference/resnet_fixtures.py`.
//!
//! Errors are max-abs relative errors: max|ours - reference| / max|reference|.

use std::collections::HashMap;

use bigroc_models::ops;
use bigroc_models::resnet::{ResNet, ResNetConfig};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;

const TOL: f64 = 1e-4;

fn fixture_path(name: &str) -> String {
    format!(
        "{}/{}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures"),
        name
    )
}

struct Fixture {
    tensors: HashMap<String, Tensor>,
    config: serde_json::Value,
}

impl Fixture {
    fn load(path: &str) -> Self {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .unwrap_or_else(|e| panic!("cannot read fixture {path}: {e}"));
        // candle does not expose the safetensors metadata; read it from the header.
        let bytes = std::fs::read(path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let config = header["__metadata__"]["config"]
            .as_str()
            .expect("fixture has __metadata__.config");
        Self {
            tensors,
            config: serde_json::from_str(config).unwrap(),
        }
    }

    fn get(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("fixture lacks {key}"))
    }

    fn resnet_config(&self) -> ResNetConfig {
        serde_json::from_value(self.config["resnet_config"].clone()).expect("resnet_config parses")
    }

    /// The model from the `model.`-prefixed tensors (prefix stripped).
    fn model(&self) -> ResNet {
        self.model_with_dtype(DType::F32)
    }

    fn model_with_dtype(&self, dtype: DType) -> ResNet {
        let weights: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("model.").map(|k| (k.to_string(), v.clone())))
            .collect();
        let vb = VarBuilder::from_tensors(weights, dtype, &Device::Cpu);
        ResNet::new(&self.resnet_config(), vb).expect("model builds from the fixture weights")
    }
}

fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.dims(), reference.dims(), "shape mismatch");
    let max_abs = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let diff =
        (ours.to_dtype(DType::F64).unwrap() - reference.to_dtype(DType::F64).unwrap()).unwrap();
    max_abs(&diff) / max_abs(reference).max(1e-30)
}

fn check(what: &str, ours: &Tensor, reference: &Tensor) {
    let err = rel_err(ours, reference);
    println!("{what}: max relative error {err:.3e}");
    assert!(err <= TOL, "{what}: relative error {err:.3e} > {TOL:e}");
}

/// Logits and d mean(CE(logits, target)) / d x, by candle autograd.
fn logits_and_input_grad(model: &ResNet, x: &Tensor, target: &Tensor) -> (Tensor, Tensor) {
    let x = Var::from_tensor(x).unwrap();
    let logits = model.forward(x.as_tensor()).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits, target).unwrap();
    let grads = loss.backward().unwrap();
    let grad = grads
        .get(x.as_tensor())
        .expect("gradient reaches the input")
        .clone();
    (logits, grad)
}

fn check_case(name: &str, inputs: &[(&str, &str, &str, &str)]) {
    let fix = Fixture::load(&fixture_path(&format!("resnet_{name}.safetensors")));
    let model = fix.model();
    for &(input, target, logits, grad) in inputs {
        let (ours_logits, ours_grad) =
            logits_and_input_grad(&model, fix.get(input), fix.get(target));
        check(&format!("{name} {logits}"), &ours_logits, fix.get(logits));
        check(&format!("{name} {grad}"), &ours_grad, fix.get(grad));
    }
    let features = model.forward_features(fix.get("input")).unwrap();
    assert_eq!(features.dim(1).unwrap(), model.config().feature_dim());
    check(&format!("{name} features"), &features, fix.get("features"));
}

#[test]
fn cifar18_matches_robustness() {
    check_case("cifar18", &[("input", "target", "logits", "input_grad")]);
}

#[test]
fn cifar50_matches_robustness() {
    check_case("cifar50", &[("input", "target", "logits", "input_grad")]);
}

#[test]
fn imagenet50_matches_torchvision_square_and_odd_sizes() {
    check_case(
        "imagenet50",
        &[
            ("input", "target", "logits", "input_grad"),
            ("input_odd", "target_odd", "logits_odd", "input_grad_odd"),
        ],
    );
}

#[test]
fn fixture_configs_match_the_constructors() {
    let cfg = |name: &str| {
        Fixture::load(&fixture_path(&format!("resnet_{name}.safetensors"))).resnet_config()
    };
    assert_eq!(cfg("cifar18"), ResNetConfig::cifar(18, 0.125, 10).unwrap());
    assert_eq!(cfg("cifar50"), ResNetConfig::cifar(50, 0.0625, 10).unwrap());
    let mut imagenet = ResNetConfig::imagenet(50, 10).unwrap();
    imagenet.blocks = [2, 1, 1, 1];
    imagenet.widths = [8, 16, 32, 64];
    assert_eq!(cfg("imagenet50"), imagenet);
    assert_eq!(
        ResNetConfig::cifar(50, 1.0, 10).unwrap().feature_dim(),
        2048
    );
    assert_eq!(ResNetConfig::cifar(18, 1.0, 10).unwrap().feature_dim(), 512);
    assert!(ResNetConfig::cifar(20, 1.0, 10).is_err());
    assert!(ResNetConfig::cifar(50, 0.01, 10).is_err());
}

#[test]
fn max_pool_matches_torch() {
    let fix = Fixture::load(&fixture_path("resnet_maxpool.safetensors"));
    let cases = fix.config["cases"].as_array().unwrap().clone();
    assert!(cases.len() >= 4);
    type Pool = fn(&Tensor, usize, usize, usize) -> candle_core::Result<Tensor>;
    let paths: [(&str, Pool); 2] = [
        ("cpu kernel", ops::max_pool2d),
        ("composite", ops::max_pool2d_composite),
    ];
    for case in &cases {
        let prefix = case["prefix"].as_str().unwrap();
        let [k, s, p] = ["kernel", "stride", "padding"].map(|f| case[f].as_u64().unwrap() as usize);
        for (path, pool) in paths {
            let x = Var::from_tensor(fix.get(&format!("{prefix}_input"))).unwrap();
            let y = pool(x.as_tensor(), k, s, p).unwrap();
            let gout = fix.get(&format!("{prefix}_gout"));
            let grads = (&y * gout).unwrap().sum_all().unwrap().backward().unwrap();
            let grad = grads.get(x.as_tensor()).unwrap();
            check(
                &format!("max_pool2d {path} k{k} s{s} p{p} output"),
                &y,
                fix.get(&format!("{prefix}_output")),
            );
            check(
                &format!("max_pool2d {path} k{k} s{s} p{p} grad"),
                grad,
                fix.get(&format!("{prefix}_grad")),
            );
        }
    }
}

#[test]
fn clamp_gradient_is_zero_at_and_beyond_the_bounds() {
    let x = Var::new(&[-0.5f32, 0.0, 0.3, 1.0, 1.5], &Device::Cpu).unwrap();
    let y = ops::clamp_with_torch_grad(x.as_tensor(), 0.0, 1.0).unwrap();
    assert_eq!(y.to_vec1::<f32>().unwrap(), [0.0, 0.0, 0.3, 1.0, 1.0]);
    let weights = Tensor::new(&[1f32, 2., 3., 4., 5.], &Device::Cpu).unwrap();
    let grads = (&y * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(
        grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
        [0.0, 0.0, 3.0, 0.0, 0.0]
    );
}

/// Full-size random-weight models (CIFAR ResNet-50 wm=1, ImageNet ResNet-50 at 224x224), written by
/// `resnet_fixtures.py --full DIR`; not committed.
///
/// In float32, logits match to 1e-4, but the input gradient is held to 5e-2 only: among the ~10^7 ReLU
/// pre-activations of a full ResNet-50 a few lie within float32 rounding of zero, and where two
/// implementations round them to different sides, the gradient changes in that unit's receptive field.
/// PyTorch's own float32 gradient differs from its float64 one by 1.9e-2 on the ImageNet model (1e-6 on
/// the CIFAR one); candle's float32 gradient differs from PyTorch's float32 one by 1.3e-2 / 5.3e-3.
/// An implementation error shows as O(1). The float64 run has no such flips and must match PyTorch's
/// float64 logits and gradient to 1e-9.
#[test]
fn full_size_resnet50s_match() {
    let Ok(dir) = std::env::var("BIGROC_RESNET_FULL_DIR") else {
        println!("SKIPPED: set BIGROC_RESNET_FULL_DIR to the directory written by `resnet_fixtures.py --full DIR`");
        return;
    };
    for name in ["robustness_cifar_resnet50", "robustness_imagenet_resnet50"] {
        let path = format!("{dir}/{name}_check.safetensors");
        if !std::path::Path::new(&path).exists() {
            println!("SKIPPED {name}: {path} is absent");
            continue;
        }
        let fix = Fixture::load(&path);
        let model = fix.model();
        let (logits, grad) = logits_and_input_grad(&model, fix.get("input"), fix.get("target"));
        check(&format!("{name} f32 logits"), &logits, fix.get("logits"));
        let err = rel_err(&grad, fix.get("input_grad"));
        println!(
            "{name} f32 input_grad: max relative error {err:.3e} (bound 5e-2, see the doc comment)"
        );
        assert!(
            err <= 5e-2,
            "{name} f32 input_grad: relative error {err:.3e}"
        );

        let model64 = fix.model_with_dtype(DType::F64);
        let x64 = fix.get("input").to_dtype(DType::F64).unwrap();
        let (logits, grad) = logits_and_input_grad(&model64, &x64, fix.get("target"));
        for (what, ours, key) in [
            ("logits", &logits, "logits_f64"),
            ("input_grad", &grad, "input_grad_f64"),
        ] {
            let err = rel_err(ours, fix.get(key));
            println!("{name} f64 {what}: max relative error {err:.3e}");
            assert!(
                err <= 1e-9,
                "{name} f64 {what}: relative error {err:.3e} > 1e-9"
            );
        }
    }
}
