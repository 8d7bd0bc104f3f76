//! Times the FID Inception forward pass on the CPU: `cargo run --release --example inception_bench
//! -- PATH [BATCH] [REPEATS]`.
use std::time::Instant;

use bigroc::eval::FidInception;
use candle_core::{DType, Device, Tensor};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .map(String::as_str)
        .unwrap_or("../shared/models/inception-2015-12-05.pt");
    let batch: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(16);
    let repeats: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(2);
    let net = FidInception::load(path.as_ref(), &Device::Cpu)?;
    let images =
        Tensor::rand(0f32, 255f32, (batch, 3, 32, 32), &Device::Cpu)?.to_dtype(DType::U8)?;
    net.forward_images(&images)?;
    let start = Instant::now();
    for _ in 0..repeats {
        net.forward_images(&images)?;
    }
    let per = start.elapsed().as_secs_f64() / (repeats * batch) as f64;
    println!(
        "batch {batch}: {:.3} s/image, {:.2} images/s",
        per,
        1.0 / per
    );
    Ok(())
}
