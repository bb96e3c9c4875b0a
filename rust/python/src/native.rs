//! The one way from Python into native work: [`native`] releases the GIL, lets the work poll Ctrl-C and
//! converts the core's error; [`DetachedMutex`] is a lock that can only be waited for with the GIL released.
//!
//! Why: a thread that waits for a lock while holding the GIL deadlocks as soon as the lock's holder needs the
//! GIL, and every long native call takes it back briefly to check for Ctrl-C; a thread that waits for a lock
//! held across I/O while holding the GIL stalls every Python thread for that long. So no lock is ever awaited
//! with the GIL held: the core's locks are only reached from inside [`native`], and the binding's own locks
//! are [`DetachedMutex`]es. `clippy.toml` bans the raw calls (`Python::detach`, `Mutex::lock`) elsewhere.

use std::sync::{Mutex, MutexGuard};

use llama_sessions::{Error, Interrupt};
use pyo3::{PyResult, Python};

use crate::context::finish;
use crate::interrupt::SignalCheck;

/// Proof that the code holding it runs with the GIL released (only [`native`] makes one), and the Ctrl-C
/// check to hand to the core's long calls.
pub struct Detached {
    signals: SignalCheck,
}

impl Interrupt for Detached {
    fn should_stop(&mut self) -> bool {
        self.signals.should_stop()
    }
}

/// Runs `work` with the GIL released. `work` gets the [`Detached`] proof, which is also the [`Interrupt`]
/// for its long calls: a Ctrl-C while it runs raises the exception the signal handler raised
/// (KeyboardInterrupt). A core error becomes its Python exception.
#[allow(clippy::disallowed_methods)] // The one place the GIL is released.
pub fn native<T, F>(py: Python<'_>, work: F) -> PyResult<T>
where
    T: Send,
    F: Send + FnOnce(&mut Detached) -> Result<T, Error>,
{
    let mut detached = Detached {
        signals: SignalCheck::new(),
    };
    let result = py.detach(|| work(&mut detached));
    finish(result, &mut detached.signals)
}

/// A mutex that can only be waited for with the GIL released: its only way in takes a [`Detached`] proof, which
/// only code inside [`native`] has.
#[derive(Debug)]
pub struct DetachedMutex<T> {
    inner: Mutex<T>,
}

impl<T: Send> DetachedMutex<T> {
    pub fn new(value: T) -> Self {
        DetachedMutex {
            inner: Mutex::new(value),
        }
    }

    /// The value, locked; the caller runs without the GIL (it holds the proof).
    #[allow(clippy::disallowed_methods)] // The GIL is released: the proof says so.
    pub fn lock<'a>(&'a self, _detached: &Detached) -> MutexGuard<'a, T> {
        // A panic inside the core becomes a Python exception, and the binding's critical sections leave their
        // data consistent before anything that can panic, so the data behind a poisoned lock is usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Locks a mutex the core shares with the binding (a Context that is also a SessionManager's live session);
/// like [`DetachedMutex::lock`], only with the GIL released.
#[allow(clippy::disallowed_methods)] // The GIL is released: the proof says so.
pub fn lock_shared<'a, T>(mutex: &'a Mutex<T>, _detached: &Detached) -> MutexGuard<'a, T> {
    // As for DetachedMutex: the core checks its bookkeeping after every change, so a poisoned context is
    // still consistent.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
