//! Choosing the compute device from a `--device` string.

use candle_core::Device;

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

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    // Device::new_cuda panics without libcuda; check first (see reference/cuda.md).
    if !candle_core::cuda::cudarc::driver::sys::is_culib_present() {
        return Err(TeacherError::Input(
            "cuda requested but the CUDA driver (libcuda.so.1) is not installed".into(),
        ));
    }
    Ok(Device::new_cuda(ordinal)?)
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
}
