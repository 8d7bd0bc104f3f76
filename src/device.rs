//! Choosing where tensors live: `--device cpu|cuda|cuda:N|auto`.

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// Parses a `--device` value. `auto` picks CUDA device 0 when this build has CUDA and a GPU is
/// present, else the CPU.
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:") {
            Some(n) => cuda(
                n.parse()
                    .with_context(|| format!("--device {other}: expected cuda:N with N an integer"))?,
            ),
            None => bail!("--device {other}: expected cpu, cuda, cuda:N or auto"),
        },
    }
}

fn cuda(ordinal: usize) -> Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        bail!("--device cuda:{ordinal}: this build has no CUDA support (rebuild with `--features cuda`)");
    }
    Device::new_cuda(ordinal).with_context(|| format!("--device cuda:{ordinal}: cannot open the GPU"))
}

/// Lets f32 matrix products on CUDA use TF32 tensor cores (about 1e-3 relative rounding per
/// product; training tolerates it, parity checks do not). No effect without CUDA.
pub fn allow_tf32(on: bool) {
    #[cfg(feature = "cuda")]
    candle_core::cuda::set_gemm_reduced_precision_f32(on);
    #[cfg(not(feature = "cuda"))]
    let _ = on;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_garbage() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("auto").is_ok());
        let err = parse_device("gpu0").unwrap_err().to_string();
        assert!(err.contains("gpu0"), "{err}");
        assert!(parse_device("cuda:x").is_err());
    }
}
