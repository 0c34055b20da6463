//! `save_torch` round trips through the crate's own `torch.save` reader; a damaged file is an
//! error, never a panic. (That torch itself reads the files is checked by
//! `tests/fixtures/torch_save_check.py`, outside CI.)

use std::path::Path;

use dfndr_teachers::weights::{save_torch, StateDict};
use dfndr_teachers::{DType, Device, TeacherError, Tensor};

/// One tensor of every dtype torch storages and candle's reader share, with 0-d, 1-d, 4-d and
/// non-contiguous (transposed) inputs.
fn sample() -> Vec<(String, Tensor)> {
    let cpu = &Device::Cpu;
    let ramp = |n: usize| (0..n).map(|i| i as f32 * 0.37 - 3.0).collect::<Vec<_>>();
    let f32_4d = Tensor::from_vec(ramp(2 * 3 * 4 * 5), (2, 3, 4, 5), cpu).unwrap();
    let transposed = Tensor::from_vec(ramp(3 * 7), (3, 7), cpu)
        .unwrap()
        .t()
        .unwrap();
    assert!(!transposed.is_contiguous());
    let big = (1i64 << 40) + 7;
    vec![
        ("logit_scale".into(), Tensor::new(4.6052f32, cpu).unwrap()),
        ("visual.conv1.weight".into(), f32_4d.clone()),
        ("text.proj".into(), transposed),
        (
            "half".into(),
            f32_4d
                .narrow(0, 1, 1)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap(),
        ),
        (
            "bf16".into(),
            Tensor::from_vec(ramp(6), 6, cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        ),
        (
            "double".into(),
            Tensor::from_vec(vec![1e-300f64, -2.5, 3.25], 3, cpu).unwrap(),
        ),
        (
            "positions".into(),
            Tensor::from_vec(vec![0i64, -1, big, i64::MIN], (2, 2), cpu).unwrap(),
        ),
        (
            "mask".into(),
            Tensor::from_vec(vec![0u8, 1, 255], (1, 3), cpu).unwrap(),
        ),
        ("scalar_i64".into(), Tensor::new(-5i64, cpu).unwrap()),
    ]
}

/// Raw bytes of a tensor's contiguous copy, to compare every dtype exactly (NaN-safe).
fn bytes(t: &Tensor) -> Vec<u8> {
    let flat = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F64 => flat
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::I64 => flat
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U8 => flat.to_vec1::<u8>().unwrap(),
        other => panic!("unexpected dtype {other:?}"),
    }
}

fn assert_same(path: &Path, written: &[(String, Tensor)]) {
    let state = StateDict::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut got: Vec<&String> = state.tensors.keys().collect();
    let mut want: Vec<&String> = written.iter().map(|(k, _)| k).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    for (name, tensor) in written {
        let back = &state.tensors[name];
        assert_eq!(back.dims(), tensor.dims(), "{name}");
        assert_eq!(back.dtype(), tensor.dtype(), "{name}");
        assert_eq!(bytes(back), bytes(tensor), "{name}");
    }
}

#[test]
fn every_dtype_and_shape_round_trips_wrapped_and_bare() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = sample();
    for (file, wrap) in [("wrapped.pt", Some("state_dict")), ("bare.pt", None)] {
        let path = dir.path().join(file);
        save_torch(&path, &tensors, wrap).unwrap();
        assert_same(&path, &tensors);
        let state = StateDict::load(&path).unwrap();
        assert_eq!(state.tensors["logit_scale"].dims(), &[] as &[usize]);
        assert_eq!(state.tensors["scalar_i64"].dims(), &[] as &[usize]);
        assert_eq!(state.tensors["text.proj"].dims(), &[7, 3]);
    }
    // Only the destination is left behind: the temporary file was renamed.
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["bare.pt", "wrapped.pt"]);
}

#[test]
fn writing_is_deterministic_and_replaces_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.pt"), dir.path().join("b.pt"));
    let tensors = sample();
    save_torch(&a, &tensors, Some("state_dict")).unwrap();
    std::fs::write(&b, b"an older file").unwrap();
    save_torch(&b, &tensors, Some("state_dict")).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

#[test]
fn entries_are_stored_and_start_on_64_byte_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aligned.pt");
    let tensors = sample();
    save_torch(&path, &tensors, None).unwrap();
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&path).unwrap()).unwrap();
    let mut names = Vec::new();
    for i in 0..zip.len() {
        let entry = zip.by_index(i).unwrap();
        assert_eq!(entry.compression(), zip::CompressionMethod::Stored);
        let name = entry.name().unwrap().to_string();
        let start = entry.data_start().unwrap();
        assert_eq!(start % 64, 0, "{name} starts at {start}");
        names.push(name);
    }
    let mut want = vec!["archive/data.pkl".to_string(), "archive/byteorder".into()];
    want.extend((0..tensors.len()).map(|i| format!("archive/data/{i}")));
    want.push("archive/version".into());
    assert_eq!(names, want);
}

#[test]
fn unsupported_dtypes_and_duplicate_names_are_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("refused.pt");
    let u32s = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
    let err = save_torch(&path, &[("ids".into(), u32s)], None).unwrap_err();
    assert!(matches!(err, TeacherError::Input(_)), "{err:?}");
    let x = Tensor::new(1f32, &Device::Cpu).unwrap();
    let err = save_torch(&path, &[("x".into(), x.clone()), ("x".into(), x)], None).unwrap_err();
    assert!(matches!(err, TeacherError::Input(_)), "{err:?}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn a_missing_folder_is_a_write_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing/model.pt");
    let x = Tensor::new(1f32, &Device::Cpu).unwrap();
    let err = save_torch(&path, &[("x".into(), x)], None).unwrap_err();
    assert!(matches!(err, TeacherError::Write { .. }), "{err:?}");
}

#[test]
fn a_damaged_file_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("whole.pt");
    save_torch(&path, &sample(), Some("state_dict")).unwrap();
    let whole = std::fs::read(&path).unwrap();
    let damaged = dir.path().join("damaged.pt");
    // Cut short at several points (inside the pickle, the tensor data, the central directory).
    for keep in [10, 100, whole.len() / 2, whole.len() - 30, whole.len() - 1] {
        std::fs::write(&damaged, &whole[..keep]).unwrap();
        let err = StateDict::load(&damaged).unwrap_err();
        assert!(
            matches!(err, TeacherError::BadCheckpoint { .. }),
            "cut to {keep}: {err:?}"
        );
    }
    // The pickle overwritten with garbage (same size, so the zip structure stays intact).
    let pkl = {
        let mut zip = zip::ZipArchive::new(std::fs::File::open(&path).unwrap()).unwrap();
        let entry = zip.by_name("archive/data.pkl").unwrap();
        entry.data_start().unwrap() as usize
    };
    let mut garbled = whole.clone();
    for (i, b) in garbled[pkl..pkl + 200].iter_mut().enumerate() {
        *b = (i * 37 % 251) as u8;
    }
    std::fs::write(&damaged, &garbled).unwrap();
    assert!(StateDict::load(&damaged).is_err());
}
