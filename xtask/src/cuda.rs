//! `cargo xtask cuda-build`: build `--features cuda` on a machine without a GPU or CUDA toolkit and
//! pack the result for a GPU machine that has no Rust toolchain.
//!
//! What the build needs from CUDA: `nvcc` (candle-kernels compiles its kernels to PTX and to a static
//! library for one compute capability; cudarc reads the CUDA version from `nvcc --version`), the
//! headers, and at link time `libcuda`, `libcudart`, `libcublas`, `libcublasLt`, `libcurand` and
//! `libnvrtc` (candle turns on cudarc's `dynamic-linking`: these become DT_NEEDED entries of the
//! binary, resolved by the dynamic loader on the GPU machine, not dlopen'ed by cudarc).
//! NVIDIA's pip wheels provide all of these except `libcuda.so`, which belongs to the driver; a link
//! stub with its soname is compiled from the names in `cuda.h`. The wheels also lack the
//! unversioned `libX.so` names the linker looks for; they get symlinks.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::run;

/// The CUDA 13.0 wheels (with update 1's compiler). The GPU machine's driver (580) runs CUDA 13.0:
/// a newer nvcc writes PTX of an ISA that driver cannot JIT, so these are pinned rather than latest.
const WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-cuda-nvrtc==13.0.88",
    "nvidia-curand==10.4.0.35",
    "nvidia-cublas==13.0.2.14",
];

/// Where the CUDA 13 wheels put their toolkit, under the `--target` directory pip installs into.
const WHEEL_ROOT: &str = "pip/nvidia/cu13";

/// The libraries the final link asks for by `-l` name (cudarc's and candle-kernels' build scripts).
const LINKED: &[&str] = &["cuda", "cudart", "cublas", "cublasLt", "curand", "nvrtc"];

/// Library directories cudarc searches under $CUDA_HOME (a subset that covers toolkits and wheels).
const LIB_DIRS: &[&str] = &["lib", "lib/stubs", "lib64", "lib64/stubs", "targets/x86_64-linux/lib", "targets/x86_64-linux/lib/stubs"];

pub struct Options {
    pub compute_cap: String,
    pub out: PathBuf,
    pub toolkit: Option<PathBuf>,
    pub examples: Vec<String>,
    pub benches: Vec<String>,
    /// Also build candle's cuDNN convolutions (feature `cudnn`; cuDNN 9 from its pip wheel).
    pub cudnn: bool,
}

/// cuDNN 9 for CUDA 13 (the `cudnn` feature); the GPU machine's own copy (PyTorch's wheel) is used at
/// run time through its soname, libcudnn.so.9.
const CUDNN_WHEEL: &str = "nvidia-cudnn-cu13==9.28.1.4";

pub fn cuda_build(root: &Path, opts: Options) -> Result<()> {
    let nvcc = find_nvcc(opts.toolkit.as_deref())?;
    let cuda_home = nvcc.parent().and_then(Path::parent).context("nvcc is not in a bin/ directory")?.to_path_buf();
    let version = Command::new(&nvcc).arg("--version").output().with_context(|| format!("cannot run {}", nvcc.display()))?;
    let release = String::from_utf8_lossy(&version.stdout)
        .lines()
        .find_map(|l| l.split(", ").nth(1).and_then(|r| r.strip_prefix("release ")).map(str::to_string))
        .unwrap_or_else(|| "?".into());
    eprintln!("using {} (CUDA {release}); the GPU machine's driver must support CUDA {release} or newer", nvcc.display());
    complete_for_linking(&cuda_home)?;
    if opts.cudnn {
        link_cudnn(&cuda_home, opts.toolkit.as_deref())?;
    }

    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(cuda_home.join("bin")).chain(std::env::split_paths(&path)))?;
    let mut cmd = crate::cargo();
    cmd.args(["build", "--release", "-p", "bigroc", "--features", if opts.cudnn { "cuda,cudnn" } else { "cuda" }, "--bin", "bigroc"])
        .args(opts.examples.iter().flat_map(|e| ["--example", e.as_str()]))
        .args(opts.benches.iter().flat_map(|b| ["--bench", b.as_str()]))
        .arg("--message-format=json-render-diagnostics")
        .env("CUDA_HOME", &cuda_home)
        .env("PATH", path)
        .env("CUDA_COMPUTE_CAP", &opts.compute_cap)
        // Smaller to carry; symbols are no use on a machine without the sources.
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .current_dir(root)
        .stdout(Stdio::piped());
    eprintln!("+ CUDA_HOME={} CUDA_COMPUTE_CAP={} CARGO_PROFILE_RELEASE_STRIP=symbols {cmd:?}", cuda_home.display(), opts.compute_cap);
    let mut child = cmd.spawn().context("cannot start cargo")?;
    let mut messages = String::new();
    child.stdout.take().expect("piped").read_to_string(&mut messages)?;
    let status = child.wait()?;
    if !status.success() {
        bail!("the cuda build failed with {status}");
    }
    // Each built executable, by target name (benches carry a hash in their file name).
    let mut executables = Vec::new();
    for line in messages.lines() {
        let Ok(m) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if let (Some(name), Some(exe)) = (m["target"]["name"].as_str(), m["executable"].as_str()) {
            executables.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    if executables.is_empty() {
        bail!("cargo reported no executable");
    }

    fs::create_dir_all(&opts.out).with_context(|| format!("cannot create {}", opts.out.display()))?;
    let mut needed = String::new();
    for (name, exe) in &executables {
        let packed = opts.out.join(format!("{name}-cuda.xz"));
        crate::xz_into(exe, &packed, "-9e")?;
        let mib = |p: &Path| fs::metadata(p).map(|m| m.len() as f64 / (1 << 20) as f64).unwrap_or(0.0);
        eprintln!("{}: {:.1} MiB ({:.1} MiB unpacked)", packed.display(), mib(&packed), mib(exe));
        if needed.is_empty() {
            needed = needed_libraries(exe).join(" ");
        }
    }
    let wrapper = opts.out.join("run-on-gpu.sh");
    fs::write(&wrapper, WRAPPER.replace("@NEEDED@", if needed.is_empty() { "?" } else { &needed }))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))?;
    }
    eprintln!("{}: run `run-on-gpu.sh --check`, then `run-on-gpu.sh bigroc --help`, on the GPU machine", wrapper.display());
    eprintln!("the binaries need at run time: {needed}");
    Ok(())
}

/// An explicit `--toolkit DIR` (installing the wheels there when it has no nvcc yet), else nvcc on
/// PATH, in $CUDA_HOME or in /usr/local/cuda.
fn find_nvcc(toolkit: Option<&Path>) -> Result<PathBuf> {
    if let Some(dir) = toolkit {
        let nvcc = dir.join(WHEEL_ROOT).join("bin/nvcc");
        if !nvcc.is_file() {
            eprintln!("installing NVIDIA's CUDA 13.0 pip wheels (about 1.2 GB) into {}", dir.display());
            run(Command::new("python3")
                .args(["-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "--target"])
                .arg(dir.join("pip"))
                .args(WHEELS))?;
        }
        if !nvcc.is_file() {
            bail!("the wheels installed into {} have no {}", dir.display(), nvcc.display());
        }
        return Ok(nvcc);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let candidates = std::env::split_paths(&path)
        .map(|d| d.join("nvcc"))
        .chain(std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/nvcc")))
        .chain([PathBuf::from("/usr/local/cuda/bin/nvcc")]);
    for nvcc in candidates {
        if nvcc.is_file() {
            // A symlink such as /usr/bin/nvcc -> ../lib/cuda/bin/nvcc: the toolkit is beside the target.
            return Ok(fs::canonicalize(&nvcc).unwrap_or(nvcc));
        }
    }
    bail!(
        "no nvcc on PATH, in $CUDA_HOME or in /usr/local/cuda; pass --toolkit DIR to install NVIDIA's \
         CUDA 13.0 pip wheels there (about 1.2 GB)"
    )
}

/// Gives the linker every `-l` library it will ask for under `cuda_home`: symlinks `libX.so` to the
/// versioned file the wheels ship, and compiles a stub `libcuda.so` (soname `libcuda.so.1`, the
/// driver's) exporting every `cu*` name in `cuda.h`; the real one is found at run time.
fn complete_for_linking(cuda_home: &Path) -> Result<()> {
    let lib = cuda_home.join("lib");
    for name in LINKED {
        let file = format!("lib{name}.so");
        if LIB_DIRS.iter().any(|d| cuda_home.join(d).join(&file).exists()) {
            continue;
        }
        if *name == "cuda" {
            let stubs = lib.join("stubs");
            fs::create_dir_all(&stubs)?;
            let header = fs::read_to_string(cuda_home.join("include/cuda.h")).context("no include/cuda.h in the toolkit")?;
            let mut names: Vec<&str> = driver_api_names(&header);
            names.sort_unstable();
            names.dedup();
            let source = stubs.join("libcuda_stub.c");
            fs::write(&source, names.iter().map(|n| format!("void {n}(void) {{}}\n")).collect::<String>())?;
            eprintln!("compiling a link-time stub {} ({} driver API names from cuda.h)", stubs.join(&file).display(), names.len());
            run(Command::new("cc")
                .args(["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o"])
                .arg(stubs.join(&file))
                .arg(&source))?;
            continue;
        }
        let versioned = fs::read_dir(&lib)
            .with_context(|| format!("no {} to link against", lib.join(&file).display()))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|f| f.strip_prefix(&file).and_then(|v| v.strip_prefix('.')).is_some_and(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.')))
            .min_by_key(|f| f.len());
        let Some(versioned) = versioned else { bail!("no {file}.N in {} to link against", lib.display()) };
        eprintln!("linking {} -> {versioned}", lib.join(&file).display());
        std::os::unix::fs::symlink(&versioned, lib.join(&file))?;
    }
    Ok(())
}

/// Gives the linker `libcudnn.so`: one already under `cuda_home`, else cuDNN's pip wheel installed
/// into `<toolkit>/cudnn` (its own pip target: pip will not add to the toolkit's `nvidia/` package
/// directory) and linked into the toolkit's lib directory.
fn link_cudnn(cuda_home: &Path, toolkit: Option<&Path>) -> Result<()> {
    if LIB_DIRS.iter().any(|d| cuda_home.join(d).join("libcudnn.so").exists()) {
        return Ok(());
    }
    let Some(toolkit) = toolkit else {
        bail!("--cudnn: no libcudnn.so under {}; install cuDNN 9 there, or pass --toolkit DIR", cuda_home.display())
    };
    let target = toolkit.join("cudnn");
    let lib = target.join("nvidia/cudnn/lib");
    if !lib.join("libcudnn.so.9").exists() {
        eprintln!("installing {CUDNN_WHEEL} (about 520 MB) into {}", target.display());
        run(Command::new("python3")
            .args(["-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "--target"])
            .arg(&target)
            .arg(CUDNN_WHEEL))?;
    }
    let link = cuda_home.join("lib/libcudnn.so");
    eprintln!("linking {} -> {}", link.display(), lib.join("libcudnn.so.9").display());
    std::os::unix::fs::symlink(lib.join("libcudnn.so.9"), &link)?;
    Ok(())
}

/// Every identifier `cu[A-Z]...` in `cuda.h`: the driver API's functions, with their `_v2`-style
/// versioned names (macros and non-functions among them only make the stub export a few extra names).
fn driver_api_names(header: &str) -> Vec<&str> {
    let bytes = header.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut names = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if ident(bytes[i]) {
            let start = i;
            while i < bytes.len() && ident(bytes[i]) {
                i += 1;
            }
            let word = &header[start..i];
            if word.len() > 2 && word.starts_with("cu") && word.as_bytes()[2].is_ascii_uppercase() {
                names.push(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The DT_NEEDED entries of an executable that name CUDA libraries (via readelf; empty without it).
fn needed_libraries(exe: &Path) -> Vec<String> {
    let Ok(out) = Command::new("readelf").arg("-d").arg(exe).output() else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split('[').nth(1)?.trim_end_matches(']').to_string()))
        .filter(|l| ["cuda", "cublas", "curand", "nvrtc", "cudnn"].iter().any(|n| l.contains(n)))
        .collect()
}

/// `run-on-gpu.sh`: unpacks a binary beside it on first use and runs it with the CUDA libraries of
/// the GPU machine on LD_LIBRARY_PATH.
const WRAPPER: &str = r#"#!/bin/sh
# Runs a CUDA build of bigroc packed by `cargo xtask cuda-build`, on a GPU machine:
#   ./run-on-gpu.sh --check               which CUDA libraries each packed binary resolves (ldd)
#   ./run-on-gpu.sh bigroc --help         runs bigroc (NAME-cuda.xz beside this script is unpacked on first use)
#   ./run-on-gpu.sh refine_throughput ... any other packed binary by its name
# The binaries load at start: @NEEDED@
# (libcuda.so.1 comes with the driver; the others from the CUDA toolkit or the nvidia pip wheels).
here=$(cd "$(dirname "$0")" && pwd)
libs=
add() { if [ -d "$1" ]; then libs="$libs${libs:+:}$1"; fi; }
for d in ${CUDA_HOME:+"$CUDA_HOME/lib64" "$CUDA_HOME/lib"} /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do add "$d"; done
for py in python3 /opt/torch/.venv/bin/python; do
    for nv in $("$py" -c 'import nvidia; print(" ".join(nvidia.__path__))' 2>/dev/null); do
        for d in "$nv"/*/lib; do add "$d"; done
    done
done
for d in /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib; do add "$d"; done
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

unpack() {
    bin="$here/$1-cuda"
    if [ ! -f "$bin.xz" ]; then
        echo "run-on-gpu.sh: no $bin.xz; packed here: $(cd "$here" && ls *-cuda.xz 2>/dev/null | sed 's/-cuda.xz$//' | tr '\n' ' ')" >&2
        exit 2
    fi
    if [ ! -x "$bin" ] || [ "$bin.xz" -nt "$bin" ]; then
        if command -v xz >/dev/null 2>&1; then
            xz -dc "$bin.xz" > "$bin.tmp" || exit 1
        else
            python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$bin.xz" > "$bin.tmp" || exit 1
        fi
        chmod +x "$bin.tmp" && mv "$bin.tmp" "$bin" || exit 1
    fi
}

if [ "$1" = --check ]; then
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    for packed in "$here"/*-cuda.xz; do
        name=$(basename "$packed" -cuda.xz)
        unpack "$name"
        echo "== $name"
        ldd "$bin" | grep -E 'cuda|cublas|curand|nvrtc|not found'
    done
    exit 0
fi
if [ $# -lt 1 ]; then
    echo "usage: $0 NAME [ARGS...]  (e.g. bigroc --help)  |  $0 --check" >&2
    exit 2
fi
name=$1
shift
unpack "$name"
exec "$bin" "$@"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_api_names_takes_cu_functions_only() {
        let h = "CUresult CUDAAPI cuInit(unsigned int Flags);\n#define cuMemAlloc cuMemAlloc_v2\ncuuint32_t x; int cu2;";
        assert_eq!(driver_api_names(h), vec!["cuInit", "cuMemAlloc", "cuMemAlloc_v2"]);
    }
}
