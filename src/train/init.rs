//! PyTorch's default parameter initialization, so that a model trained here starts from the same
//! distribution as one trained by the reference code.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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
            _ => anyhow::bail!("no initialization rule for parameter `{name}` of shape {dims:?}"),
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

enum Filled {
    Const(f64),
    Uniform(f64),
}
