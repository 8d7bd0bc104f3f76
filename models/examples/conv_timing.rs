//! Forward + input-gradient time of one convolution: `conv2d_const_weight` against candle's autograd
//! through `Tensor::conv2d` (which also computes the kernel gradient and uses `conv_transpose2d`).
//! Both fwd+bwd columns include the toy loss `sum(y * g)` and candle's backward bookkeeping for it
//! (column `loss`); the last three columns time the input gradient alone.
//!
//! `cargo run -p bigroc-models --example conv_timing --profile test [-- REPEATS]` (the test profile
//! optimizes this crate too, without the release profile's LTO build time).

use std::time::Instant;

use bigroc_models::conv::{conv2d_const_weight, conv2d_input_grad_col2im, conv2d_input_grad_conv};
use candle_core::{Device, Result, Tensor, Var};

/// Shortest wall time in milliseconds of `repeats` runs of `f`, after one warm-up run (the minimum is
/// the least disturbed by other load on a shared machine).
fn time_ms(repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(times.into_iter().fold(f64::INFINITY, f64::min))
}

fn main() -> Result<()> {
    let repeats: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("REPEATS must be a number"))
        .unwrap_or(5);
    let dev = Device::Cpu;
    println!(
        "batch 32, f32, CPU, best of {repeats} runs (ms); backward = input gradient of sum(y * g)"
    );
    println!(
        "{:<26} | forward: {:>6} {:>6} | fwd+bwd: {:>6} {:>6} {:>7} {:>4} | backward only: {:>6} {:>9} {:>11}",
        "conv", "candle", "ours", "candle", "ours", "speedup", "loss", "col2im", "conv-path", "candle ct2d"
    );
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
            x.as_tensor()
                .detach()
                .conv2d(&w, padding, stride, 1, 1)
                .map(drop)
        })?;
        let our_fwd = time_ms(repeats, || {
            conv2d_const_weight(&x.as_tensor().detach(), &w, stride, padding).map(drop)
        })?;
        // The toy loss sum(y * g) and candle's backward bookkeeping, common to both columns.
        let y_var = Var::from_tensor(&y)?;
        let loss = time_ms(repeats, || {
            (y_var.as_tensor() * &g)?.sum_all()?.backward().map(drop)
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
        let hw = (size, size);
        let col2im = time_ms(repeats, || {
            conv2d_input_grad_col2im(&g, &w, hw, stride, padding).map(drop)
        })?;
        let conv_path = time_ms(repeats, || {
            conv2d_input_grad_conv(&g, &w, hw, stride, padding).map(drop)
        })?;
        // What candle's conv2d backward uses for the input gradient (same output_padding rule).
        let out_padding = size + 2 * padding - k - (g.dim(2)? - 1) * stride;
        let transpose = time_ms(repeats, || {
            g.conv_transpose2d(&w, padding, out_padding, stride, 1)
                .map(drop)
        })?;
        let name = format!("{c_in}->{c_out} {size}x{size} k{k} s{stride} p{padding}");
        println!(
            "{name:<26} | {:>8} {fwd:>6.1} {our_fwd:>6.1} | {:>8} {candle:>6.1} {ours:>6.1} {:>6.1}x {loss:>4.0} | {:>14} {col2im:>6.1} {conv_path:>9.1} {transpose:>11.1}",
            "", "", candle / ours, ""
        );
    }
    Ok(())
}
