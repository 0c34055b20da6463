//! dfndr-simd: the SIMD level at which dfndr's own CPU kernels run.
//!
//! Every hand-vectorised loop of dfndr (softmax, activations, small-row products, resampling)
//! is compiled several times, once per level, and picks one at run time. The level is the best
//! the CPU has, or a lower one forced with the environment variable `DFNDR_SIMD`:
//!
//! | `DFNDR_SIMD` | kernels run with |
//! |---|---|
//! | unset, `auto` | the best the CPU has |
//! | `avx512` | AVX-512F + FMA, if the CPU has them |
//! | `avx2` | AVX2 + FMA at most |
//! | `scalar` | the build's baseline (plain x86-64: SSE2) |
//!
//! Forcing a level down lets a machine with AVX-512 test the code paths that users' AVX2-only
//! or older CPUs take. A level above what the CPU has runs at what the CPU has. (Matrix
//! products go through the `gemm` crate, which picks its kernels from the CPU alone, and JPEG
//! decoding through libjpeg-turbo, which has its own switch, `JSIMD_FORCENONE=1`.)

use std::sync::OnceLock;

/// The name of the environment variable that forces the level down.
pub const ENV: &str = "DFNDR_SIMD";

/// A SIMD level, ordered from the plainest to the widest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// The build's baseline instruction set (SSE2 on x86-64).
    Scalar,
    /// AVX2 with FMA.
    Avx2,
    /// AVX-512F with FMA.
    Avx512,
}

impl Level {
    /// The level's name as `DFNDR_SIMD` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    /// Every level, plainest first.
    pub const ALL: [Level; 3] = [Level::Scalar, Level::Avx2, Level::Avx512];
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A `DFNDR_SIMD` value that names no level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownLevel(pub String);

impl std::fmt::Display for UnknownLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{ENV}={:?} names no SIMD level (expected auto, avx512, avx2 or scalar)",
            self.0
        )
    }
}

impl std::error::Error for UnknownLevel {}

/// Parses a `DFNDR_SIMD` value: `None` for `auto` or an empty value (no limit).
pub fn parse(value: &str) -> Result<Option<Level>, UnknownLevel> {
    match value.trim().to_ascii_lowercase().as_str() {
        "" | "auto" => Ok(None),
        "avx512" | "avx-512" | "avx512f" => Ok(Some(Level::Avx512)),
        "avx2" => Ok(Some(Level::Avx2)),
        "scalar" | "none" | "sse2" => Ok(Some(Level::Scalar)),
        _ => Err(UnknownLevel(value.to_string())),
    }
}

/// The level `DFNDR_SIMD` asks for (`None`: no limit), or why its value is not understood.
/// A program calls this at start-up to refuse a misspelt value; [`level`] only warns.
pub fn requested() -> Result<Option<Level>, UnknownLevel> {
    match std::env::var(ENV) {
        Ok(v) => parse(&v),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(UnknownLevel(v.to_string_lossy().into())),
    }
}

/// The best level this CPU supports.
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("fma")
        {
            return Level::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Level::Avx2;
        }
    }
    Level::Scalar
}

/// The level to run at: the detected one, capped by `requested` when given.
pub fn effective(detected: Level, requested: Option<Level>) -> Level {
    requested.map_or(detected, |r| r.min(detected))
}

/// The level the kernels of this process run at (read once, on first use). A `DFNDR_SIMD`
/// value that names no level is reported on stderr once and ignored.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let requested = requested().unwrap_or_else(|e| {
            eprintln!("warning: {e}; using the detected level");
            None
        });
        effective(detected(), requested)
    })
}

/// Runs `$f(args)` (an `#[inline(always)]` function returning `()`) compiled for the process's SIMD
/// [`level`]: AVX-512F+FMA, AVX2+FMA, or the build's baseline. The default build targets plain
/// x86-64, and such loops are several times faster with wide vectors and FMA. Used as the tail
/// of a function (it returns from it).
#[macro_export]
macro_rules! simd_dispatch {
    ($f:ident($($arg:expr),* $(,)?)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,fma")]
            unsafe fn avx512(f: impl FnOnce()) {
                f()
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2(f: impl FnOnce()) {
                f()
            }
            match $crate::level() {
                // SAFETY: `level()` never exceeds what the CPU was detected to support.
                $crate::Level::Avx512 => return unsafe { avx512(|| $f($($arg),*)) },
                // SAFETY: as above.
                $crate::Level::Avx2 => return unsafe { avx2(|| $f($($arg),*)) },
                $crate::Level::Scalar => {}
            }
        }
        $f($($arg),*)
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_level_and_refuses_typos() {
        assert_eq!(parse("auto"), Ok(None));
        assert_eq!(parse(""), Ok(None));
        assert_eq!(parse("AVX2"), Ok(Some(Level::Avx2)));
        assert_eq!(parse(" avx512 "), Ok(Some(Level::Avx512)));
        assert_eq!(parse("scalar"), Ok(Some(Level::Scalar)));
        let err = parse("avx3").unwrap_err();
        assert!(err.to_string().contains("DFNDR_SIMD=\"avx3\""), "{err}");
    }

    #[test]
    fn a_requested_level_only_lowers_the_detected_one() {
        assert_eq!(effective(Level::Avx512, Some(Level::Avx2)), Level::Avx2);
        assert_eq!(effective(Level::Avx512, Some(Level::Scalar)), Level::Scalar);
        assert_eq!(effective(Level::Avx2, Some(Level::Avx512)), Level::Avx2);
        assert_eq!(effective(Level::Avx2, None), Level::Avx2);
        assert_eq!(effective(Level::Scalar, Some(Level::Avx2)), Level::Scalar);
    }

    #[test]
    fn the_process_level_follows_the_environment() {
        // The test runner sets DFNDR_SIMD for the lower-level runs of `make test`.
        let want = effective(detected(), requested().unwrap());
        assert_eq!(level(), want);
    }

    /// The dispatched function runs at every level and gives the plain loop's result.
    #[test]
    fn dispatch_runs_the_function() {
        #[inline(always)]
        fn sum_generic(x: &[f32], out: &mut f32) {
            *out = x.iter().sum();
        }
        fn sum(x: &[f32], out: &mut f32) {
            simd_dispatch!(sum_generic(x, out))
        }
        let x: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let mut out = 0.0;
        sum(&x, &mut out);
        assert_eq!(out, 4950.0);
    }
}
