//! Forward + input-gradient time of one convolution: `conv2d_const_weight` against candle's autograd
//! through `Tensor::conv2d` (which also computes the kernel gradient and uses `conv_transpose2d`).
//!
//! `cargo run -p bigroc-models --example conv_timing --release [-- REPEATS]`

use std::time::Instant;

use bigroc_models::conv::conv2d_const_weight;
use candle_core::{Device, Result, Tensor, Var};

/// Median wall time in milliseconds of `repeats` runs of `f`, after one warm-up run.
fn time_ms(repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn main() -> Result<()> {
    let repeats: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("REPEATS must be a number"))
        .unwrap_or(5);
    let dev = Device::Cpu;
    println!("batch 32, f32, CPU, median of {repeats} runs (ms); backward = input gradient of sum(y * g)");
    println!("{:<28} {:>9} {:>14} {:>14} {:>8}", "conv", "forward", "ours fwd+bwd", "candle fwd+bwd", "speedup");
    // (c_in, c_out, size, kernel, stride, padding): ResNet-18 CIFAR convolutions at width 64.
    for (c_in, c_out, size, k, stride, padding) in [
        (64, 64, 32, 3, 1, 1),
        (64, 128, 32, 3, 2, 1),
        (64, 128, 32, 1, 2, 0),
        (3, 64, 64, 7, 2, 3),
    ] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (32, c_in, size, size), &dev)?)?;
        let w = (Tensor::randn(0f32, 1., (c_out, c_in, k, k), &dev)? * 0.05)?;
        let y = x.as_tensor().conv2d(&w, padding, stride, 1, 1)?;
        let g = Tensor::randn(0f32, 1., y.dims(), &dev)?;
        let fwd = time_ms(repeats, || {
            x.as_tensor().detach().conv2d(&w, padding, stride, 1, 1).map(drop)
        })?;
        let ours = time_ms(repeats, || {
            let y = conv2d_const_weight(x.as_tensor(), &w, stride, padding)?;
            let grads = (y * &g)?.sum_all()?.backward()?;
            assert!(grads.get(x.as_tensor()).is_some());
            Ok(())
        })?;
        let candle = time_ms(repeats, || {
            let y = x.as_tensor().conv2d(&w, padding, stride, 1, 1)?;
            let grads = (y * &g)?.sum_all()?.backward()?;
            assert!(grads.get(x.as_tensor()).is_some());
            Ok(())
        })?;
        let name = format!("{c_in}->{c_out} {size}x{size} k{k} s{stride} p{padding}");
        println!("{name:<28} {fwd:>9.1} {ours:>14.1} {candle:>14.1} {:>7.1}x", candle / ours);
    }
    Ok(())
}
