//! Reads the tensors of PyTorch files without Python: TorchScript archives (`torch.jit.save`), zip
//! checkpoints (`torch.save`, PyTorch >= 1.6) and legacy checkpoints (`torch.save` with
//! `_use_new_zipfile_serialization=False`, the format of older published weights).
//!
//! The pickles are parsed with `candle_core::pickle`; tensors are found by walking the unpickled
//! object: a state dict (`name -> tensor`) or a scripted module (attributes, recursively, named
//! `attr.attr.param` like `Module.state_dict()`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::{DType, Device, Tensor};

/// All tensors of a PyTorch file, with their state-dict names, on the CPU.
pub fn read_torch_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?
        .read_exact(&mut magic)
        .with_context(|| format!("{}: too short to be a PyTorch file", path.display()))?;
    let tensors = if &magic == b"PK\x03\x04" {
        read_zip(path)
    } else if magic[0] == 0x80 {
        read_legacy(path)
    } else {
        bail!("not a PyTorch checkpoint (neither zip nor pickle)")
    };
    tensors.with_context(|| format!("reading PyTorch file {}", path.display()))
}

fn unpickle<R: BufRead>(r: &mut R) -> Result<Object> {
    let mut stack = Stack::empty();
    stack.read_loop(r)?;
    Ok(stack.finalize()?)
}

/// Collects the tensor descriptions reachable from `obj`, naming them like a state dict.
/// `dir` is the prefix candle puts before storage keys (the zip folder of the storages).
fn collect_tensors(obj: Object, prefix: &str, dir: &Path, out: &mut Vec<TensorInfo>) -> Result<()> {
    match obj {
        // A state dict, or the attribute dict of a scripted module.
        Object::Dict(items) => {
            for (key, value) in items {
                let Object::Unicode(key) = key else { continue };
                let name = if prefix.is_empty() {
                    key
                } else {
                    format!("{prefix}.{key}")
                };
                if matches!(value, Object::Reduce { .. }) {
                    let info = value.into_tensor_info(Object::Unicode(name), dir)?;
                    out.extend(info);
                } else {
                    collect_tensors(value, &name, dir, out)?;
                }
            }
        }
        // A scripted module: `NEWOBJ` of its class, then `BUILD` with its attribute dict.
        Object::Build { args, .. } => collect_tensors(*args, prefix, dir, out)?,
        _ => {}
    }
    Ok(())
}

/// Builds a tensor from the bytes of its storage and its layout (offset and strides).
fn tensor_from_storage(info: &TensorInfo, storage: &[u8]) -> Result<Tensor> {
    let layout = &info.layout;
    let elem = info.dtype.size_in_bytes();
    let start = layout.start_offset();
    let n = layout.shape().elem_count();
    let t = if layout.is_contiguous() {
        let bytes = storage
            .get(start..start + n * elem)
            .with_context(|| format!("tensor {} runs past the end of its storage", info.name))?;
        Tensor::from_raw_buffer(bytes, info.dtype, layout.dims(), &Device::Cpu)?
    } else {
        // A strided view: gather it from the flat storage.
        let flat_len = storage.len() / elem;
        let flat = Tensor::from_raw_buffer(
            &storage[..flat_len * elem],
            info.dtype,
            &[flat_len],
            &Device::Cpu,
        )?;
        let offset = start / elem;
        let mut index = vec![offset as i64];
        for (&dim, &stride) in layout.dims().iter().zip(layout.stride()) {
            index = index
                .iter()
                .flat_map(|&base| (0..dim).map(move |i| base + (i * stride) as i64))
                .collect();
        }
        let index = Tensor::from_vec(index, n, &Device::Cpu)?;
        flat.index_select(&index, 0)?.reshape(layout.dims())?
    };
    Ok(t)
}

fn read_zip(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut zip = zip::ZipArchive::new(BufReader::new(std::fs::File::open(path)?))?;
    let names = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<std::result::Result<Vec<String>, _>>()?;
    let pkl_name = names
        .into_iter()
        .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .min()
        .context("no <name>/data.pkl inside the zip: not a PyTorch archive")?;
    let dir = pkl_name
        .strip_suffix(".pkl")
        .unwrap_or(&pkl_name)
        .to_string();
    let obj = unpickle(&mut BufReader::new(zip.by_name(&pkl_name)?))
        .with_context(|| format!("unpickling {pkl_name}"))?;
    let mut infos = vec![];
    collect_tensors(obj, "", Path::new(&dir), &mut infos)?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = Vec::with_capacity(infos.len());
    for info in infos {
        if !storages.contains_key(&info.path) {
            let mut bytes = vec![];
            zip.by_name(&info.path)
                .with_context(|| format!("storage {} of tensor {}", info.path, info.name))?
                .read_to_end(&mut bytes)?;
            storages.insert(info.path.clone(), bytes);
        }
        let t = tensor_from_storage(&info, &storages[&info.path])?;
        out.push((info.name, t));
    }
    Ok(out)
}

/// `pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)`: the first record of a legacy `torch.save`.
/// Compared byte for byte because candle's pickle reader cannot hold a 10-byte integer.
const LEGACY_MAGIC: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.";

fn read_legacy(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut r = BufReader::new(std::fs::File::open(path)?);
    let mut magic = vec![0u8; LEGACY_MAGIC.len()];
    r.read_exact(&mut magic)?;
    if magic != LEGACY_MAGIC {
        bail!("a pickle but not a torch.save file (wrong magic number)");
    }
    let _protocol = unpickle(&mut r).context("protocol version record")?;
    if let Object::Dict(sys_info) = unpickle(&mut r).context("system info record")? {
        for (k, v) in sys_info {
            if k == Object::Unicode("little_endian".into()) && v == Object::Bool(false) {
                bail!("saved on a big-endian machine, not supported");
            }
        }
    }
    let obj = unpickle(&mut r).context("the saved object")?;
    let mut infos = vec![];
    // Storages are named by their key alone here (no folder).
    collect_tensors(obj, "", Path::new(""), &mut infos)?;
    let keys = match unpickle(&mut r).context("storage key list")? {
        Object::List(keys) => keys,
        other => bail!("expected the list of storage keys, got {other:?}"),
    };
    let key_of = |info: &TensorInfo| info.path.trim_start_matches('/').to_string();
    let dtype_of: HashMap<String, DType> = infos.iter().map(|i| (key_of(i), i.dtype)).collect();
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    for key in keys {
        let Object::Unicode(key) = key else {
            bail!("storage key is not a string: {key:?}")
        };
        let mut len = [0u8; 8];
        r.read_exact(&mut len)?;
        let numel = u64::from_le_bytes(len) as usize;
        let dtype = *dtype_of
            .get(&key)
            .with_context(|| format!("storage {key} is used by no tensor"))?;
        let mut bytes = vec![0u8; numel * dtype.size_in_bytes()];
        r.read_exact(&mut bytes)
            .with_context(|| format!("storage {key}: file truncated"))?;
        storages.insert(key, bytes);
    }
    infos
        .into_iter()
        .map(|info| {
            let storage = storages
                .get(&key_of(&info))
                .with_context(|| format!("storage of tensor {} is missing", info.name))?;
            Ok((info.name.clone(), tensor_from_storage(&info, storage)?))
        })
        .collect()
}
