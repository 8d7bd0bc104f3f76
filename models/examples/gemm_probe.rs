use std::time::Instant;
use candle_core::{Device, Tensor, Result};
fn main() -> Result<()> {
    let dev = Device::Cpu;
    for (m, k, n, b) in [(2048usize, 2048usize, 2048usize, 1usize), (256, 576, 1024, 32), (512, 4608, 16, 32), (512, 4608, 512, 1), (64, 64, 1024, 32), (256, 64, 32768, 1)] {
        let a = Tensor::randn(0f32, 1., (m, k), &dev)?;
        let x = Tensor::randn(0f32, 1., (b, k, n), &dev)?;
        let f = || a.broadcast_left(b).unwrap().matmul(&x).unwrap();
        f();
        let t = Instant::now();
        let reps = 5;
        for _ in 0..reps { f(); }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!("m{m} k{k} n{n} b{b}: {:.1} ms, {:.1} GFLOP/s", s * 1e3, 2.0 * (m * k * n * b) as f64 / s / 1e9);
    }
    Ok(())
}
