//! Checkpoint reading and strict binding: every container OpenCLIP users have, the exact
//! state-dict key sets of the built-in architectures, and clear errors for damaged or
//! mismatched files. Writing: `save_torch` (module `torch_save`).

use dfndr_teachers::device::Compute;
use std::collections::BTreeMap;
use std::path::PathBuf;

use dfndr_teachers::blocks::Kernels;
use dfndr_teachers::weights::{StateDict, WeightSource};
use dfndr_teachers::{ClipConfig, ClipModel, DType, Device, TeacherError, Tensor};
use serde_json::Value;

/// Writing torch.save files (in this binary: one link fewer on CI).
#[path = "checkpoints/torch_save.rs"]
mod torch_save;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/teachers")
}

fn as_f32_map(state: &StateDict) -> BTreeMap<String, Vec<f32>> {
    state
        .tensors
        .iter()
        .map(|(k, t)| {
            let v = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (k.clone(), v)
        })
        .collect()
}

fn expected(prefix: &str) -> BTreeMap<String, Vec<f32>> {
    let all = candle_core::safetensors::load(
        fixtures().join("formats/expected.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    all.into_iter()
        .filter(|(k, _)| {
            if prefix.is_empty() {
                !k.contains("16.")
            } else {
                k.starts_with(prefix)
            }
        })
        .map(|(k, t)| {
            (
                k[prefix.len()..].to_string(),
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        })
        .collect()
}

#[test]
fn every_container_loads_to_the_same_values() {
    let f32s = expected("");
    assert!(f32s.len() >= 10, "fixture has {} keys", f32s.len());
    for (file, want) in [
        ("plain.bin", &f32s),
        ("wrapped.pt", &f32s), // {"state_dict": {"module." + k: v}, "epoch": 3}
        ("half.safetensors", &f32s),
        ("bf16.bin", &expected("bf16.")),
    ] {
        let state = StateDict::load(&fixtures().join("formats").join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(&as_f32_map(&state), want, "{file}");
    }
    // The 0-d logit_scale survives as a 0-d tensor.
    let state = StateDict::load(&fixtures().join("formats/plain.bin")).unwrap();
    assert_eq!(state.tensors["logit_scale"].dims(), &[] as &[usize]);
}

#[test]
fn strided_views_in_a_pickle_are_read_as_their_values() {
    let pickled = StateDict::load(&fixtures().join("formats/views.bin")).unwrap();
    let reference = StateDict::load(&fixtures().join("formats/views.safetensors")).unwrap();
    assert_eq!(pickled.tensors.len(), reference.tensors.len());
    for (k, want) in &reference.tensors {
        let got = &pickled.tensors[k];
        assert_eq!(got.dims(), want.dims(), "{k}");
        assert_eq!(got.dtype(), want.dtype(), "{k}");
        assert_eq!(as_f32_map(&pickled)[k], as_f32_map(&reference)[k], "{k}");
    }
}

#[test]
fn legacy_pickles_get_a_re_save_hint() {
    let err = StateDict::load(&fixtures().join("formats/legacy.bin"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("legacy") && err.contains("re-save"), "{err}");
}

#[test]
fn damaged_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(fixtures().join("clip_quickgelu.safetensors")).unwrap();
    let bin = std::fs::read(fixtures().join("formats/plain.bin")).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "half.safetensors",
            good[..good.len() / 2].to_vec(),
            "damaged safetensors",
        ),
        (
            "header.safetensors",
            good[..100].to_vec(),
            "truncated safetensors",
        ),
        (
            "cut.bin",
            bin[..bin.len() / 2].to_vec(),
            "damaged or unsupported torch.save",
        ),
        (
            "text.pt",
            b"this is not a checkpoint at all\n".to_vec(),
            "unrecognised format",
        ),
        ("empty.bin", Vec::new(), "unrecognised format"),
    ];
    for (name, bytes, want) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = StateDict::load(&path).unwrap_err();
        assert!(
            matches!(err, TeacherError::BadCheckpoint { .. }),
            "{name}: {err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(want) && msg.contains(name), "{name}: {msg}");
    }
    // A valid zip whose pickle is garbage: an error, not a panic.
    let mut garbage = Vec::new();
    {
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(&mut garbage));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        zip.start_file("archive/data.pkl", opts).unwrap();
        std::io::Write::write_all(
            &mut zip,
            b"\x80\x02}q\x00(X\x01\x00\x00\x00ac_codecs\nencode\nq\x01\x85R.",
        )
        .unwrap();
        zip.finish().unwrap();
    }
    let path = dir.path().join("garbage.bin");
    std::fs::write(&path, &garbage).unwrap();
    let err = StateDict::load(&path).unwrap_err();
    assert!(matches!(err, TeacherError::BadCheckpoint { .. }), "{err:?}");

    // A flipped byte inside the JSON header.
    let mut bad = good.clone();
    bad[20] = b'\xff';
    let path = dir.path().join("flipped.safetensors");
    std::fs::write(&path, bad).unwrap();
    assert!(StateDict::load(&path).is_err());
    let missing = StateDict::load(&dir.path().join("nope.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(missing.contains("nope.safetensors"), "{missing}");
}

/// The tiny quickgelu CLIP's config, as recorded by the golden script.
fn tiny() -> ClipConfig {
    let toml = r#"
        embed_dim = 32
        quick_gelu = true
        [vision]
        image_size = 32
        patch_size = 8
        width = 64
        layers = 2
        head_width = 32
        [text]
        vocab_size = 1000
        width = 48
        heads = 2
        layers = 2
    "#;
    toml::from_str(toml).unwrap()
}

fn bind(cfg: &ClipConfig, state: StateDict) -> Result<ClipModel, TeacherError> {
    ClipModel::load(
        cfg,
        &WeightSource::Tensors(state),
        &Compute::cpu(),
        Kernels::Fused,
        "tiny",
    )
}

#[test]
fn explicit_toml_numbers_load_the_golden_checkpoint() {
    let state = StateDict::load(&fixtures().join("clip_quickgelu.safetensors")).unwrap();
    bind(&tiny(), state).unwrap();
}

#[test]
fn mismatches_list_every_missing_unexpected_and_misshapen_key() {
    let load = || StateDict::load(&fixtures().join("clip_quickgelu.safetensors")).unwrap();
    // Missing and unexpected.
    let mut state = load();
    state.tensors.remove("visual.ln_post.weight");
    state.tensors.remove("ln_final.bias");
    state.tensors.insert(
        "visual.extra".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let TeacherError::Mismatch(m) = bind(&tiny(), state).unwrap_err() else {
        panic!()
    };
    assert_eq!(
        m.missing,
        vec![
            ("visual.ln_post.weight".to_string(), vec![64]),
            ("ln_final.bias".to_string(), vec![48])
        ]
    );
    assert_eq!(m.unexpected, vec![("visual.extra".to_string(), vec![3])]);
    let msg = m.to_string();
    assert!(
        msg.contains("2 missing, 1 unexpected, 0 with the wrong shape"),
        "{msg}"
    );
    assert!(msg.contains("visual.ln_post.weight [64]"), "{msg}");

    // Wrong architecture: same keys, other widths.
    let mut wider = tiny();
    wider.text.width = 64;
    let TeacherError::Mismatch(m) = bind(&wider, load()).unwrap_err() else {
        panic!()
    };
    assert!(m.missing.is_empty() && m.unexpected.is_empty());
    assert!(m
        .wrong_shape
        .iter()
        .any(|(k, e, g)| k == "ln_final.weight" && e == &vec![64] && g == &vec![48]));
    assert!(m.to_string().contains("check the architecture name"), "{m}");

    // A CustomTextCLIP checkpoint into a plain CLIP config names the switch.
    let mut custom = load();
    let text_keys: Vec<String> = custom
        .tensors
        .keys()
        .filter(|k| !k.starts_with("visual.") && *k != "logit_scale")
        .cloned()
        .collect();
    for k in text_keys {
        let t = custom.tensors.remove(&k).unwrap();
        custom.tensors.insert(format!("text.{k}"), t);
    }
    let msg = bind(&tiny(), custom).unwrap_err().to_string();
    assert!(msg.contains("custom_text = true"), "{msg}");
}

#[test]
fn builtin_architectures_have_openclips_exact_key_sets() {
    for arch in [
        "ViT-L-14",
        "ViT-L-14-quickgelu",
        "ViT-B-16",
        "ViT-B-32",
        "ViT-H-14",
    ] {
        let golden: Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(format!("keys/{arch}.json"))).unwrap(),
        )
        .unwrap();
        let want: BTreeMap<String, Vec<usize>> = golden["keys"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, s)| {
                (
                    k.clone(),
                    s.as_array()
                        .unwrap()
                        .iter()
                        .map(|d| d.as_u64().unwrap() as usize)
                        .collect(),
                )
            })
            .collect();
        assert_eq!(want.len(), golden["num_keys"].as_u64().unwrap() as usize);
        let ours = ClipModel::state_dict_shapes(&ClipConfig::named(arch).unwrap()).unwrap();
        assert_eq!(
            ours.len(),
            want.len(),
            "{arch}: a key requested twice or a count mismatch"
        );
        let ours: BTreeMap<String, Vec<usize>> = ours.into_iter().collect();
        assert_eq!(ours, want, "{arch}");
    }
    assert!(ClipConfig::named("ViT-Q-99")
        .unwrap_err()
        .to_string()
        .contains("ViT-L-14-quickgelu"));
}

#[test]
fn random_weights_are_deterministic_and_not_degenerate() {
    let cfg = tiny();
    let random = |seed| {
        ClipModel::load(
            &cfg,
            &WeightSource::Random(seed),
            &Compute::cpu(),
            Kernels::Fused,
            "tiny",
        )
        .unwrap()
    };
    let (a, b, c) = (random(3), random(3), random(4));
    let ids = vec![vec![998, 5, 17, 999, 0, 0], vec![998, 42, 999, 0, 0, 0]];
    let ea = a.encode_text(&ids).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(ea, b.encode_text(&ids).unwrap().to_vec2::<f32>().unwrap());
    assert_ne!(ea, c.encode_text(&ids).unwrap().to_vec2::<f32>().unwrap());
    assert_ne!(ea[0], ea[1]);
    assert!(ea.iter().flatten().all(|x| x.is_finite()));
}
