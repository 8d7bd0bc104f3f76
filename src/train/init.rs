//! PyTorch's default parameter initialization, so that a model trained here starts from the same
//! distribution as one trained by the reference code.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// Re-initializes every variable of `vars` (in sorted-name order, from `seed`) as PyTorch's layer
/// constructors do: convolution and linear weights uniform in +-1/sqrt(fan_in) (kaiming_uniform
/// with a = sqrt(5)), linear biases likewise with the weight's fan_in, batch-norm weights 1 and
/// biases 0, running means 0 and variances 1. Linear layers are recognized by a 2-D `weight`.
pub fn torch_default_init(vars: &VarMap, seed: u64) -> Result<()> {
    let data = vars.data().lock().expect("var map lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = StdRng::seed_from_u64(seed);
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let (prefix, leaf) = name.rsplit_once('.').unwrap_or(("", name.as_str()));
        let linear_weight = data.get(&format!("{prefix}.weight")).filter(|w| w.rank() == 2);
        let value = match (leaf, dims.len()) {
            ("running_mean", _) | ("bias", 1) if linear_weight.is_none() => Filled::Const(0.0),
            ("running_var", _) | ("weight", 1) => Filled::Const(1.0),
            ("num_batches_tracked", _) => continue,
            ("weight", _) => Filled::Uniform(1.0 / (dims[1..].iter().product::<usize>() as f64).sqrt()),
            ("bias", 1) => Filled::Uniform(1.0 / (linear_weight.expect("checked").dims()[1] as f64).sqrt()),
            _ => bail!("no initialization rule for parameter `{name}` of shape {dims:?}"),
        };
        let n: usize = dims.iter().product();
        let values: Vec<f32> = match value {
            Filled::Const(c) => vec![c as f32; n],
            Filled::Uniform(b) => (0..n).map(|_| rng.random_range(-b..b) as f32).collect(),
        };
        let t = Tensor::from_vec(values, dims.as_slice(), &Device::Cpu)?
            .to_dtype(var.dtype())?
            .to_device(var.device())?;
        var.set(&t).with_context(|| format!("initializing `{name}`"))?;
    }
    Ok(())
}

/// guided-diffusion's initialization of its UNet and EncoderUNet, from `seed`, in sorted-name
/// order: PyTorch's layer defaults (convolution and linear weights and biases uniform in
/// +-1/sqrt(fan_in) of the weight, GroupNorm weight 1 and bias 0), zeros for every parameter of
/// the layers `zeroed` names (those the reference wraps in `zero_module`), the class embedding
/// `label_emb` ~ N(0, 1) (nn.Embedding) and an attention pool's `positional_embedding`
/// ~ N(0, 1) / sqrt(channels).
pub fn adm_init(vars: &VarMap, seed: u64, zeroed: &dyn Fn(&str) -> bool) -> Result<()> {
    let data = vars.data().lock().expect("var map lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = StdRng::seed_from_u64(seed);
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let (layer, leaf) = name.rsplit_once('.').unwrap_or(("", name.as_str()));
        let weight_dims = data.get(&format!("{layer}.weight")).map(|w| w.dims().to_vec());
        let values: Vec<f32> = match (leaf, dims.len()) {
            _ if zeroed(layer) => vec![0.0; n],
            ("positional_embedding", 2) => {
                let scale = 1.0 / (dims[0] as f64).sqrt();
                (0..n).map(|_| (rng.sample::<f64, _>(StandardNormal) * scale) as f32).collect()
            }
            ("weight", 2) if layer == "label_emb" => (0..n).map(|_| rng.sample::<f32, _>(StandardNormal)).collect(),
            // GroupNorm affine (a 1-D weight).
            ("weight", 1) => vec![1.0; n],
            ("bias", 1) if weight_dims.as_ref().is_some_and(|w| w.len() == 1) => vec![0.0; n],
            // Convolutions and linear layers: weight and bias from the weight's fan-in.
            ("weight", _) | ("bias", 1) => {
                let w = if leaf == "weight" { dims.clone() } else { weight_dims.clone().with_context(|| format!("no weight for bias `{name}`"))? };
                let bound = 1.0 / (w[1..].iter().product::<usize>() as f64).sqrt();
                (0..n).map(|_| rng.random_range(-bound..bound) as f32).collect()
            }
            _ => bail!("no initialization rule for parameter `{name}` of shape {dims:?}"),
        };
        let t = Tensor::from_vec(values, dims.as_slice(), &Device::Cpu)?.to_dtype(var.dtype())?.to_device(var.device())?;
        var.set(&t).with_context(|| format!("initializing `{name}`"))?;
    }
    Ok(())
}

enum Filled {
    Const(f64),
    Uniform(f64),
}
