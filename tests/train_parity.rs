//! One adversarial training step against the robustness library's own (`train._model_loop` with
//! `AttackerModel(make_adv=True)`: untargeted L2 PGD in eval mode, then the train-mode
//! cross-entropy of the attacked batch), on the fixture made by
//! `xtask/reference/resnet_train_fixtures.py`: attacked images, logits, loss, every parameter
//! gradient and the updated running statistics.

mod common;

use bigroc::refine::{Norm, PgdConfig};
use bigroc::train::classifier::TrainableResNet;
use bigroc_models::resnet::ResNetConfig;
use candle_core::{DType, Device};
use common::{load_fixture, rel_err};

#[test]
fn adversarial_step_matches_robustness() {
    let (t, meta) = load_fixture("resnet_train_cifar18_adv.safetensors");
    let cfg: ResNetConfig = serde_json::from_value(meta["resnet_config"].clone()).unwrap();
    let kwargs = &meta["attack_kwargs"];
    assert_eq!(kwargs["constraint"], "2");
    let attack = PgdConfig {
        norm: Norm::L2,
        eps: kwargs["eps"].as_f64().unwrap(),
        step_size: kwargs["step_size"].as_f64().unwrap(),
        steps: kwargs["iterations"].as_u64().unwrap() as usize,
        use_best: kwargs["use_best"].as_bool().unwrap(),
    };
    let weights = t.iter().filter_map(|(k, v)| k.strip_prefix("model.").map(|k| (k.to_string(), v.clone()))).collect();
    let net = TrainableResNet::from_tensors(&cfg, &weights, &Device::Cpu).unwrap();
    let y = t["target"].to_dtype(DType::U32).unwrap();

    let adv = net.attack(&t["input"], &y, Some(&attack)).unwrap();
    let e_adv = rel_err(&adv, &t["adv"]);
    let (logits, loss) = net.loss(&adv, &y).unwrap();
    let (e_logits, e_loss) = (rel_err(&logits, &t["logits"]), rel_err(&loss.reshape(1).unwrap(), &t["loss"]));
    let grads = loss.backward().unwrap();
    let mut e_grad = 0f32;
    for (name, var) in net.parameters() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        e_grad = e_grad.max(rel_err(g, &t[&format!("grad.{name}")]));
    }
    let mut e_running = 0f32;
    for (name, var) in net.vars.data().lock().unwrap().iter() {
        if let Some(want) = t.get(&format!("running.{name}")) {
            e_running = e_running.max(rel_err(var.as_tensor(), want));
        }
    }
    println!("adversarial step vs robustness: attacked images {e_adv:.2e}, logits {e_logits:.2e}, loss {e_loss:.2e}, gradients {e_grad:.2e}, running stats {e_running:.2e}");
    for (what, e) in [("attacked images", e_adv), ("logits", e_logits), ("loss", e_loss), ("gradients", e_grad), ("running stats", e_running)] {
        assert!(e <= 1e-4, "{what}: relative error {e:.3e}");
    }
}
