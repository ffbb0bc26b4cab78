//! Locking the `RwLock`s the Python store classes wrap: poison-tolerant guards, and the one
//! lock order every call that locks several stores follows.

use std::collections::HashMap;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

pub(crate) fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // A panic inside a call is turned into a Python exception by PyO3; the data is still
    // consistent (every mutation validates before it changes anything), so ignore poisoning.
    lock.read().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// Read-lock each distinct lock once; returns, per input, the index of its guard.
pub(crate) fn read_distinct<'a, T>(
    locks: &[&'a RwLock<T>],
) -> (Vec<usize>, Vec<RwLockReadGuard<'a, T>>) {
    let keys: Vec<usize> = locks
        .iter()
        .map(|&l| l as *const RwLock<T> as usize)
        .collect();
    let (slots, order) = lock_slots(&keys);
    let guards = order.iter().map(|&i| read(locks[i])).collect();
    (slots, guards)
}

/// Deadlock avoidance for calls that lock several stores: every such call takes its locks in
/// ascending address order, so two calls can never wait on each other in a cycle. Given one key
/// (address) per input, returns per input the slot of its (deduplicated) guard, and the input
/// index to lock for each slot, slots in ascending address order.
pub(crate) fn lock_slots(keys: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let mut distinct: Vec<(usize, usize)> = Vec::new(); // (address, first input index)
    let mut seen: HashMap<usize, ()> = HashMap::new();
    for (i, &k) in keys.iter().enumerate() {
        if seen.insert(k, ()).is_none() {
            distinct.push((k, i));
        }
    }
    distinct.sort_unstable();
    let slot_of: HashMap<usize, usize> = distinct
        .iter()
        .enumerate()
        .map(|(slot, &(k, _))| (k, slot))
        .collect();
    let slots = keys.iter().map(|k| slot_of[k]).collect();
    let order = distinct.into_iter().map(|(_, i)| i).collect();
    (slots, order)
}
