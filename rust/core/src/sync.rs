//! Locks whose data stays usable after a panic.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`. Every critical section of this crate leaves its data consistent before anything that can
/// panic, so the data behind a poisoned lock is still usable.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
