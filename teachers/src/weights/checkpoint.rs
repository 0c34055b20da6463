//! Reading state dicts from safetensors files and PyTorch zip pickles.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{plain, Result, TeacherError};

/// A state dict: tensor name to tensor (on the CPU, in the checkpoint's dtype).
#[derive(Debug, Clone)]
pub struct StateDict {
    /// The tensors, with OpenCLIP's key names (wrappers and `module.` prefixes removed).
    pub tensors: HashMap<String, Tensor>,
    /// The file they came from.
    pub path: PathBuf,
}

/// What the first bytes of a checkpoint say it is.
#[derive(Debug, PartialEq, Eq)]
enum Container {
    Safetensors,
    TorchZip,
    LegacyPickle,
}

impl StateDict {
    /// Reads a `.safetensors` file or a PyTorch `torch.save` zip (`.bin`, `.pt`, `.pth`),
    /// unwrapping a `state_dict` (or `model`) entry and a DataParallel `module.` prefix.
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |reason: String| TeacherError::BadCheckpoint {
            path: path.to_path_buf(),
            reason,
        };
        let tensors = match sniff(path)? {
            Container::Safetensors => candle_core::safetensors::load(path, &Device::Cpu)
                .map_err(|e| bad(format!("damaged safetensors file ({})", plain(&e))))?,
            // candle's pickle reader indexes into what the file declares and can panic on a
            // malformed pickle; a bad file must be an error, never a crash.
            Container::TorchZip => std::panic::catch_unwind(|| read_torch_zip(path))
                .unwrap_or_else(|_| Err("malformed pickle (the reader gave up on it)".into()))
                .map_err(bad)?,
            Container::LegacyPickle => {
                return Err(bad(
                    "this is the legacy (pre-1.6, non-zip) torch.save format; re-save it in Python with \
                     `torch.save(torch.load(path), new_path)` or convert it to safetensors"
                        .into(),
                ))
            }
        };
        if tensors.is_empty() {
            return Err(bad("it contains no tensors".into()));
        }
        Ok(Self {
            tensors: strip_module_prefix(tensors),
            path: path.to_path_buf(),
        })
    }

    /// `(name, shape)` of every tensor, sorted by name.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut v: Vec<_> = self
            .tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect();
        v.sort();
        v
    }

    /// Removes and returns every tensor whose name starts with `prefix` (prefix kept), e.g. to
    /// hand a CoCa checkpoint's `text_decoder.` to the captioner.
    pub fn split_off(&mut self, prefix: &str) -> HashMap<String, Tensor> {
        let names: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        names
            .into_iter()
            .filter_map(|k| self.tensors.remove(&k).map(|t| (k, t)))
            .collect()
    }
}

fn sniff(path: &Path) -> Result<Container> {
    let io = |source| TeacherError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut head = [0u8; 9];
    let n = file.read(&mut head).map_err(io)?;
    let head = &head[..n];
    let bad = |reason: String| TeacherError::BadCheckpoint {
        path: path.to_path_buf(),
        reason,
    };
    if head.starts_with(b"PK\x03\x04") {
        return Ok(Container::TorchZip);
    }
    if head.len() >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]) {
        return Ok(Container::LegacyPickle);
    }
    if head.len() == 9 && head[8] == b'{' {
        let header = u64::from_le_bytes([
            head[0], head[1], head[2], head[3], head[4], head[5], head[6], head[7],
        ]);
        if header.saturating_add(8) > len {
            return Err(bad(format!(
                "truncated safetensors file: the header alone needs {} bytes, the file has {len}",
                header + 8
            )));
        }
        return Ok(Container::Safetensors);
    }
    Err(bad(format!(
        "unrecognised format ({len} bytes; expected safetensors or a torch.save zip)"
    )))
}

/// Reads every tensor of a torch zip pickle, trying the top-level dict, then the
/// `state_dict` and `model` entries.
fn read_torch_zip(path: &Path) -> Result<HashMap<String, Tensor>, String> {
    for key in [None, Some("state_dict"), Some("model")] {
        let pth = match candle_core::pickle::PthTensors::new(path, key) {
            Ok(pth) => pth,
            // A missing key is "try the next one"; a broken zip is fatal.
            Err(e) if key.is_some() && e.to_string().contains("not found") => continue,
            Err(e) => {
                return Err(format!(
                    "damaged or unsupported torch.save file ({})",
                    plain(&e)
                ))
            }
        };
        let names: Vec<String> = pth.tensor_infos().keys().cloned().collect();
        if names.is_empty() {
            continue;
        }
        let mut tensors = HashMap::with_capacity(names.len());
        for name in names {
            let info = &pth.tensor_infos()[&name];
            let strided = !info.layout.is_contiguous() && !info.layout.is_fortran_contiguous();
            let read = if strided {
                read_strided(path, info).map(Some)
            } else {
                pth.get(&name)
            };
            match read {
                Ok(Some(t)) => {
                    tensors.insert(name, t);
                }
                Ok(None) => {}
                Err(e) => return Err(format!("cannot read tensor {name:?} ({})", plain(&e))),
            }
        }
        return Ok(tensors);
    }
    Err("it holds no tensors at the top level or under `state_dict` / `model`".into())
}

/// Reads a tensor saved as a strided view of a larger storage (a column slice, an
/// `expand`): the whole storage, then a gather of the view's elements.
fn read_strided(
    path: &Path,
    info: &candle_core::pickle::TensorInfo,
) -> candle_core::Result<Tensor> {
    let file = std::fs::File::open(path)?;
    let mut zip =
        zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(candle_core::Error::wrap)?;
    let mut entry = zip.by_name(&info.path).map_err(candle_core::Error::wrap)?;
    let mut bytes = Vec::new();
    entry.read_to_end(&mut bytes)?;
    let elem = info.dtype.size_in_bytes();
    let stored = bytes.len() / elem;
    let storage =
        Tensor::from_raw_buffer(&bytes[..stored * elem], info.dtype, &[stored], &Device::Cpu)?;
    let dims = info.layout.dims();
    let strides = info.layout.stride();
    let count: usize = dims.iter().product();
    // candle's pickle reader keeps the storage offset in bytes.
    let start = info.layout.start_offset() / elem;
    let mut offsets = Vec::with_capacity(count);
    let mut index = vec![0usize; dims.len()];
    for _ in 0..count {
        let off = start + index.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
        if off >= stored {
            candle_core::bail!("view reaches element {off} of a storage of {stored}");
        }
        offsets.push(off as u32);
        // Row-major increment of the multi-index.
        for d in (0..dims.len()).rev() {
            index[d] += 1;
            if index[d] < dims[d] {
                break;
            }
            index[d] = 0;
        }
    }
    let offsets = Tensor::from_vec(offsets, count, &Device::Cpu)?;
    storage.index_select(&offsets, 0)?.reshape(dims)
}

/// DataParallel/DDP checkpoints prefix every key with `module.`; OpenCLIP strips it when all
/// keys have it.
fn strip_module_prefix(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    if !tensors.keys().all(|k| k.starts_with("module.")) {
        return tensors;
    }
    tensors
        .into_iter()
        .map(|(k, t)| (k["module.".len()..].to_string(), t))
        .collect()
}
