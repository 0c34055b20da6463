//! With the `cuda` feature, let the binary find the CUDA libraries of a standard install
//! without LD_LIBRARY_PATH (see ../shared/reference/cuda.md). Nothing otherwise.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!(
            "cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN:/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib"
        );
    }
}
