//! Shared by the bounded fuzz tests of the library crates (`shards/tests/fuzz_stored.rs`,
//! `shards/tests/fuzz_apple.rs`, `augment/tests/fuzz_paug.rs`), which include it with `#[path]`:
//! a global allocator that records the largest single allocation of the current thread, a
//! runner that feeds a proptest strategy to a reader for a fixed number of cases and reports
//! what it saw, and ([`mutate`]) byte-level damage for valid inputs.
//!
//! The point of the allocation bound: a reader of stored values must size its buffers by the
//! bytes it was given, never by a number read from them. A few KB of input must never ask the
//! allocator for more than [`MAX_ALLOCATION`] at once.

#![allow(dead_code)]

pub mod mutate;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// The largest single allocation a reader may make for inputs of a few KB.
pub const MAX_ALLOCATION: usize = 64 << 20;

/// [`System`], recording the largest allocation (or reallocation target) per thread.
///
/// Per thread, so that tests running in parallel in one binary each see their own readers
/// (the readers under test are single-threaded).
pub struct CountingAlloc;

thread_local! {
    // `const` initialisation: no lazy allocation inside the allocator.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// Set from `DFNDR_FUZZ_ABORT_ABOVE=BYTES` by [`fuzz`]: abort the process at the first
/// allocation above BYTES, so that a debugger (`gdb -ex run -ex bt --args TEST_BINARY NAME`)
/// shows who made it.
static ABORT_ABOVE: AtomicUsize = AtomicUsize::new(usize::MAX);

fn record(size: usize) {
    if size > ABORT_ABOVE.load(Ordering::Relaxed) {
        std::process::abort();
    }
    // `try_with`: the slot may be gone while the thread shuts down.
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size);
        }
    });
}

// SAFETY: every call is forwarded unchanged to `System`; recording touches no memory the
// allocator hands out.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Forgets the largest allocation seen so far on this thread.
pub fn reset_largest() {
    LARGEST.with(|l| l.set(0));
}

/// The largest allocation on this thread since [`reset_largest`].
pub fn largest() -> usize {
    LARGEST.with(Cell::get)
}

/// The case count: `PROPTEST_CASES` when set (for longer runs), else `default`, which keeps the
/// test bounded in CI. (`ProptestConfig::with_cases` alone would ignore the variable.)
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Panics inside `crates` (paths of their sources, e.g. `/parquet-`) counted instead of printed.
static DEPENDENCY_PANICS: AtomicUsize = AtomicUsize::new(0);

/// Where those panics were raised (`file:line`), for the report.
static DEPENDENCY_PANIC_SITES: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Installs (once) a panic hook that counts panics raised inside `crates` and leaves the
/// printing of every other panic to the default hook; returns the counter.
///
/// For readers that call a library known to panic on some corrupt input and catch that panic
/// themselves (the DFNDR reader turns the parquet crate's into an error): the caught panics are
/// counted and reported, not printed by the thousand.
pub fn count_dependency_panics(crates: &'static [&'static str]) -> &'static AtomicUsize {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let inside = info
                .location()
                .is_some_and(|l| crates.iter().any(|c| l.file().contains(c)));
            if inside {
                DEPENDENCY_PANICS.fetch_add(1, Ordering::Relaxed);
                if let (Some(l), Ok(mut sites)) = (info.location(), DEPENDENCY_PANIC_SITES.lock()) {
                    let file = l.file().rsplit("/src/").next().unwrap_or(l.file());
                    sites.insert(format!("{file}:{}", l.line()));
                }
            } else {
                default(info);
            }
        }));
    });
    &DEPENDENCY_PANICS
}

/// The distinct places (`file:line` within their crate) of the panics counted by
/// [`count_dependency_panics`].
pub fn dependency_panic_sites() -> Vec<String> {
    DEPENDENCY_PANIC_SITES
        .lock()
        .map(|s| s.iter().cloned().collect())
        .unwrap_or_default()
}

/// Runs `check` on `default_cases` inputs of `strategy` (see [`cases`]), failing the test on a
/// panic, on an error `check` returns, or on an allocation above [`MAX_ALLOCATION`] (proptest
/// then shrinks the input and prints it). Prints the number of cases, the time and the largest
/// allocation at the end.
pub fn fuzz<S: Strategy>(
    name: &str,
    default_cases: u32,
    strategy: S,
    check: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let config = Config {
        cases: cases(default_cases),
        // Inputs are cheap; keep shrinking short so a failure reports quickly.
        max_shrink_iters: 2048,
        // Failures print their minimal input; the cases worth keeping are committed as
        // explicit regression tests instead of proptest's regression files.
        failure_persistence: None,
        ..Config::default()
    };
    if let Some(bytes) = std::env::var("DFNDR_FUZZ_ABORT_ABOVE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        ABORT_ABOVE.store(bytes, Ordering::Relaxed);
    }
    let mut runner = TestRunner::new(config.clone());
    let ran = Cell::new(0u64);
    let worst = Cell::new(0usize);
    let started = Instant::now();
    let result = runner.run(&strategy, |input| {
        ran.set(ran.get() + 1);
        reset_largest();
        let outcome = check(input);
        let largest = largest();
        worst.set(worst.get().max(largest));
        outcome?;
        if largest > MAX_ALLOCATION {
            return Err(TestCaseError::fail(format!(
                "allocated {largest} bytes at once, above the bound of {MAX_ALLOCATION}"
            )));
        }
        Ok(())
    });
    eprintln!(
        "fuzz {name}: {} cases ({} runs) in {:.2} s, largest allocation {} bytes (bound {MAX_ALLOCATION})",
        config.cases,
        ran.get(),
        started.elapsed().as_secs_f64(),
        worst.get()
    );
    if let Err(e) = result {
        panic!("fuzz {name}: {e}");
    }
}
