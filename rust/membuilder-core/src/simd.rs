//! Run-time choice of vector width for plain element loops.
//!
//! The encoder's element-wise work (bf16 rounding, GELU, softmax, LayerNorm) is written as plain
//! loops that LLVM vectorises. Compiled for the baseline x86-64 target they would use 128-bit
//! SSE only; [`dispatch!`] compiles the same body three times (AVX-512F, AVX2 + FMA, baseline)
//! and calls the widest one this CPU has. The results are the same on every path, bit for bit:
//! the bodies use no fused multiply-add (Rust never contracts `a * b + c`) and reduce in a fixed
//! lane order (the tests compare every path with the baseline).

/// A vector width [`dispatch!`] can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Avx512,
    Avx2,
    Baseline,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Avx512 => "avx512",
            Level::Avx2 => "avx2",
            Level::Baseline => "baseline",
        }
    }
}

/// The widest level this CPU runs (AVX-512F; else AVX2 with FMA; else the baseline).
pub fn best() -> Level {
    static BEST: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") {
                return Level::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return Level::Avx2;
            }
        }
        Level::Baseline
    })
}

/// Every level this CPU runs, widest first (for tests that compare them).
pub fn available() -> Vec<Level> {
    [Level::Avx512, Level::Avx2, Level::Baseline]
        .into_iter()
        .skip_while(|l| *l != best())
        .collect()
}

#[cfg(test)]
thread_local! {
    /// A level forced on this thread by a test (never wider than [`best`]).
    pub static FORCED: std::cell::Cell<Option<Level>> = const { std::cell::Cell::new(None) };
}

/// The level [`dispatch!`] takes on this thread: [`best`], or in tests what [`FORCED`] says.
#[inline]
pub fn chosen() -> Level {
    #[cfg(test)]
    if let Some(level) = FORCED.with(|f| f.get()) {
        assert!(
            available().contains(&level),
            "{level:?} is not available here"
        );
        return level;
    }
    best()
}

/// `fn name(args) { body }` compiled per vector width and called at [`chosen`]'s.
macro_rules! dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? { generic($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn mid($($arg: $ty),*) $(-> $ret)? { generic($($arg),*) }
                match $crate::simd::chosen() {
                    // SAFETY: `chosen` only returns levels this CPU runs.
                    $crate::simd::Level::Avx512 => return unsafe { wide($($arg),*) },
                    $crate::simd::Level::Avx2 => return unsafe { mid($($arg),*) },
                    $crate::simd::Level::Baseline => {}
                }
            }
            generic($($arg),*)
        }
    };
}
pub(crate) use dispatch;

/// Run `f` once per available level, with that level forced on this thread.
#[cfg(test)]
pub fn at_every_level(mut f: impl FnMut(Level)) {
    for level in available() {
        FORCED.with(|c| c.set(Some(level)));
        f(level);
    }
    FORCED.with(|c| c.set(None));
}
