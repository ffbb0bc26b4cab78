//! Fork-safe use of rayon's global thread pool.
//!
//! rayon's global pool is created lazily, on first use, and its worker threads do not survive a
//! `fork()`: a child process forked after the parent used the pool would wait forever on workers
//! that do not exist (Ray, multiprocessing with the `fork` start method, and veRL all fork). Every
//! parallel loop in this crate therefore asks [`enabled`] first: it is true in the process that
//! first used the pool (and in any process that never has), false in a forked child of a process
//! that had started it. In such a child the same work runs sequentially on the calling thread, so
//! results are identical, only slower. No `pthread_atfork` hook is needed: the process id tells.

use std::sync::atomic::{AtomicU32, Ordering};

/// Process id that first started the global pool (0: nobody yet).
static POOL_PID: AtomicU32 = AtomicU32::new(0);

/// Whether parallel loops may use rayon's global pool in this process (see the module docs).
///
/// Calling it claims the pool for the current process if no process has yet.
pub fn enabled() -> bool {
    let me = std::process::id();
    match POOL_PID.compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => true,
        Err(owner) => owner == me,
    }
}

/// Threads that parallel work may use here: rayon's pool size, or 1 in a forked child.
pub fn threads() -> usize {
    if enabled() {
        rayon::current_num_threads().max(1)
    } else {
        1
    }
}

/// `(0..n).map(f).collect()`, in parallel when [`enabled`]; the order of results is the order of
/// indices either way.
pub fn map_indices<T, F>(n: usize, f: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize) -> T + Sync + Send,
{
    map_indices_min(n, 1, f)
}

/// [`map_indices`] where every parallel task takes at least `min_len` indices, for a cheap `f`
/// whose work would not pay for a task each; `n <= min_len` runs on the calling thread.
pub fn map_indices_min<T, F>(n: usize, min_len: usize, f: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize) -> T + Sync + Send,
{
    use rayon::prelude::*;
    let min_len = min_len.max(1);
    if n > min_len && enabled() {
        (0..n)
            .into_par_iter()
            .with_min_len(min_len)
            .map(f)
            .collect()
    } else {
        (0..n).map(f).collect()
    }
}

/// Apply `f` to every element of `items` (mutably), in parallel when [`enabled`].
pub fn for_each_mut<T, F>(items: &mut [T], f: F)
where
    T: Send,
    F: Fn(usize, &mut T) + Sync + Send,
{
    use rayon::prelude::*;
    if items.len() > 1 && enabled() {
        items.par_iter_mut().enumerate().for_each(|(i, t)| f(i, t));
    } else {
        items.iter_mut().enumerate().for_each(|(i, t)| f(i, t));
    }
}
