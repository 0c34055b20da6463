//! The `cuda` feature must not rot although CI machines have no CUDA toolchain: where one is
//! present (nvcc on the PATH, or the pinned one `make cuda` fetches under target/cuda-tools),
//! the GPU build of dfndr and the benchmark harnesses is type-checked (`make cuda-check`; the
//! first run compiles candle's CUDA kernels, about 10 minutes on 2 cores). Elsewhere the test
//! says why it checked nothing.

use std::path::Path;
use std::process::Command;

#[test]
fn cuda_feature_compiles_where_a_toolchain_is_present() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let pinned = root.join("target/cuda-tools/nvcc/bin/nvcc");
    let on_path = Command::new("nvcc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !on_path && !pinned.exists() {
        println!(
            "SKIPPED: no CUDA toolchain (no nvcc on the PATH, no {}); run `make cuda` once to \
             fetch the pinned one and this test type-checks the cuda feature",
            pinned.display()
        );
        return;
    }
    let out = Command::new("make")
        .arg("-C")
        .arg(&root)
        .arg("--no-print-directory")
        .arg("cuda-check")
        .output()
        .expect("make runs");
    assert!(
        out.status.success(),
        "`make cuda-check` failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
