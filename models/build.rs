//! With the `cuda` feature, compiles the crate's CUDA kernels (`src/cuda/*.cu`) to PTX with nvcc,
//! the way candle-kernels does: nvcc from $CUDA_HOME/bin, $CUDA_PATH/bin or PATH; PTX for compute
//! capability 8.0 (Ampere; the driver JIT-compiles it for newer GPUs) unless $CUDA_COMPUTE_CAP says
//! otherwise.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: &[&str] = &["channel_affine", "group_norm", "im2col", "optimizer_step"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| std::env::var_os(v))
        .map(|home| PathBuf::from(home).join("bin/nvcc"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").ok().map(|c| c.trim().replace('.', "")).filter(|c| !c.is_empty());
    // PTX for at most 8.0 runs on every later GPU; a lower capability asks for itself.
    let arch = match cap.as_deref().and_then(|c| c.parse::<u32>().ok()) {
        Some(c) if c < 80 => format!("compute_{c}"),
        _ => "compute_80".to_string(),
    };
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for name in KERNELS {
        let src = format!("src/cuda/{name}.cu");
        println!("cargo:rerun-if-changed={src}");
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", &format!("-arch={arch}"), "-o"])
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {} to compile {src} (the cuda feature needs nvcc): {e}", nvcc.display()));
        assert!(status.success(), "{} failed on {src}", nvcc.display());
    }
}
