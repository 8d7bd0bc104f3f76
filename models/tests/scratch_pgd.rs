use std::collections::HashMap;
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarBuilder;
use bigroc_models::resnet::{ResNet, ResNetConfig};

fn per_sample_ce(logits: &Tensor, target: &Tensor) -> Tensor {
    let lsm = candle_nn::ops::log_softmax(logits, 1).unwrap();
    lsm.gather(&target.unsqueeze(1).unwrap(), 1).unwrap().squeeze(1).unwrap().neg().unwrap()
}
#[test]
fn pgd() {
    for (case, dt) in [("cifar18", DType::F64), ("imagenet50", DType::F64), ("imagenet50", DType::F32)] {
        let path = format!("{}/../tests/fixtures/resnet_{case}.safetensors", env!("CARGO_MANIFEST_DIR"));
        let t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let meta: serde_json::Value = serde_json::from_str(header["__metadata__"]["config"].as_str().unwrap()).unwrap();
        let cfg: ResNetConfig = serde_json::from_value(meta["resnet_config"].clone()).unwrap();
        let w: HashMap<String, Tensor> = t.iter().filter_map(|(k, v)| k.strip_prefix("model.").map(|k| (k.to_string(), v.clone()))).collect();
        let m = ResNet::new(&cfg, VarBuilder::from_tensors(w, dt, &Device::Cpu)).unwrap();
        let orig = t["input"].to_dtype(dt).unwrap();
        let bsz = orig.dim(0).unwrap();
        for (name, p) in meta["pgd"].as_object().unwrap() {
            let eps = p["eps"].as_f64().unwrap(); let step = p["step_size"].as_f64().unwrap();
            let linf = p["constraint"] == "inf";
            let target = &t[&format!("pgd.{name}.target")];
            let mut x = orig.clone();
            let mut best: Option<(Tensor, Tensor)> = None;
            let mut all_losses = vec![];
            for it in 0..=7 {
                let xv = Var::from_tensor(&x).unwrap();
                let losses = per_sample_ce(&m.forward(xv.as_tensor()).unwrap(), target);
                all_losses.push(losses.clone());
                best = Some(match best {
                    None => (losses.clone(), x.clone()),
                    Some((bl, bx)) => {
                        let rep = losses.lt(&bl).unwrap();
                        let rep4 = rep.reshape((bsz, 1, 1, 1)).unwrap().broadcast_as(x.shape()).unwrap();
                        (rep.where_cond(&losses, &bl).unwrap(), rep4.where_cond(&x, &bx).unwrap())
                    }
                });
                if it == 7 { break; }
                let loss = losses.mean_all().unwrap().neg().unwrap();
                let g = loss.backward().unwrap().get(xv.as_tensor()).unwrap().clone();
                if linf {
                    let xn = (&x + (g.sign().unwrap() * step).unwrap()).unwrap();
                    let diff = (xn - &orig).unwrap().clamp(-eps, eps).unwrap();
                    x = (diff + &orig).unwrap().clamp(0f64, 1f64).unwrap();
                } else {
                    let gn = g.flatten_from(1).unwrap().sqr().unwrap().sum(1).unwrap().sqrt().unwrap().reshape((bsz, 1, 1, 1)).unwrap();
                    let xn = (&x + (g.broadcast_div(&(gn + 1e-10).unwrap()).unwrap() * step).unwrap()).unwrap();
                    let diff = (xn - &orig).unwrap();
                    let dn = diff.flatten_from(1).unwrap().sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
                    let dnv = dn.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
                    let scale: Vec<f32> = dnv.iter().map(|&d| if d > eps as f32 { (eps as f32) / (d + 1e-7) } else { 1.0 }).collect();
                    let scale = Tensor::new(scale.as_slice(), &Device::Cpu).unwrap().to_dtype(dt).unwrap().reshape((bsz, 1, 1, 1)).unwrap();
                    x = (orig.clone() + diff.broadcast_mul(&scale).unwrap()).unwrap().clamp(0f64, 1f64).unwrap();
                }
            }
            let out = best.unwrap().1;
            let r = &t[&format!("pgd.{name}.output")];
            let err = (out.to_dtype(DType::F32).unwrap() - r).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            let losses = Tensor::stack(&all_losses, 0).unwrap().to_dtype(DType::F32).unwrap();
            let lerr = (&losses - &t[&format!("pgd.{name}.losses")]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            if false { let d = (&losses - &t[&format!("pgd.{name}.losses")]).unwrap().abs().unwrap(); println!("{d}"); }
            println!("{case} {dt:?} {name}: max|out - ref| {err:.3e}, max|losses - ref| {lerr:.3e}");
            let _ = D::Minus1;
        }
    }
}
