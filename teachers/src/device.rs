//! Where and in which precision models run: the compute device from a `--device` string and
//! the precision from a `precision` setting, in one place for the teachers, the captioner and
//! the trainer.

use candle_core::{DType, Device};

use crate::error::{Result, TeacherError};

/// Parses `cpu`, `cuda` or `cuda:N`. CUDA needs a build with the `cuda` feature and a driver.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("cpu") {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                TeacherError::Input(format!("bad device {spec:?}: expected cpu, cuda or cuda:N"))
            })?,
        None => {
            return Err(TeacherError::Input(format!(
                "bad device {spec:?}: expected cpu, cuda or cuda:N"
            )))
        }
    };
    cuda_device(ordinal)
}

/// The number format of weights and matrix products. Normalisations, softmax, the logit
/// scale and the embeddings handed out are float32 in every precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// float32 throughout (the CPU default: exact parity with OpenCLIP in float32).
    F32,
    /// bfloat16 weights, activations and matrix products (the GPU default: OpenCLIP's
    /// bf16 autocast).
    Bf16,
}

impl Precision {
    /// Parses `auto`, `f32` (`fp32`, `float32`) or `bf16` (`bfloat16`); `auto` is bf16 on a
    /// GPU and f32 on the CPU.
    pub fn parse(spec: &str, device: &Device) -> Result<Precision> {
        match spec.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(if device.is_cpu() {
                Precision::F32
            } else {
                Precision::Bf16
            }),
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            _ => Err(TeacherError::Input(format!(
                "bad precision {spec:?}: expected auto, f32 or bf16"
            ))),
        }
    }

    /// The dtype of weights and activations.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }

    /// The configuration value.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// A device and the precision models run in on it.
#[derive(Clone, Debug)]
pub struct Compute {
    /// Where tensors live.
    pub device: Device,
    /// Weights and activations.
    pub precision: Precision,
}

impl Compute {
    /// float32 on the CPU.
    pub fn cpu() -> Compute {
        Compute {
            device: Device::Cpu,
            precision: Precision::F32,
        }
    }

    /// Parses a `--device` and a `precision` setting (see [`parse_device`] and
    /// [`Precision::parse`]).
    pub fn parse(device: &str, precision: &str) -> Result<Compute> {
        let device = parse_device(device)?;
        let precision = Precision::parse(precision, &device)?;
        Ok(Compute { device, precision })
    }

    /// The dtype of weights and activations.
    pub fn dtype(&self) -> DType {
        self.precision.dtype()
    }

    /// Human-readable, for logs: `cpu f32`, `cuda:0 bf16`.
    pub fn describe(&self) -> String {
        let device = match &self.device {
            Device::Cpu => "cpu".to_string(),
            Device::Cuda(_) => match self.device.location() {
                candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
                _ => "cuda".to_string(),
            },
            Device::Metal(_) => "metal".to_string(),
        };
        format!("{device} {}", self.precision.name())
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    // candle links the driver library (libcuda.so.1) at load time, so a binary that runs has
    // one; a missing GPU or a driver too old for the kernels is an error from cuInit or
    // context creation, which cudarc may also raise as a panic: both end up here as one
    // message.
    match std::panic::catch_unwind(|| Device::new_cuda(ordinal)) {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(e)) => Err(TeacherError::Input(format!(
            "cannot use GPU cuda:{ordinal}: {e}"
        ))),
        Err(panic) => {
            let reason = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_else(|| "the CUDA driver failed".into());
            Err(TeacherError::Input(format!(
                "cannot use GPU cuda:{ordinal}: {reason}"
            )))
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> Result<Device> {
    Err(TeacherError::Input(
        "this dfndr was built without CUDA; rebuild with `--features cuda` or use --device cpu"
            .into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_junk() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("gpu").is_err());
        assert!(parse_device("cuda:x").is_err());
        #[cfg(not(feature = "cuda"))]
        assert!(parse_device("cuda:0")
            .unwrap_err()
            .to_string()
            .contains("without CUDA"));
    }

    #[test]
    fn precision_defaults_by_device_and_parses_names() {
        assert_eq!(
            Precision::parse("auto", &Device::Cpu).unwrap(),
            Precision::F32
        );
        assert_eq!(
            Precision::parse("BF16", &Device::Cpu).unwrap(),
            Precision::Bf16
        );
        assert_eq!(
            Precision::parse("fp32", &Device::Cpu).unwrap(),
            Precision::F32
        );
        let err = Precision::parse("f16", &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("auto, f32 or bf16"), "{err}");
        let c = Compute::parse("cpu", "bf16").unwrap();
        assert_eq!(
            (c.dtype(), c.describe()),
            (DType::BF16, "cpu bf16".to_string())
        );
    }
}
