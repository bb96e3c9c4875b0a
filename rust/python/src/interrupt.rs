//! Ctrl-C during long native work. The work runs with the GIL released; between two decode calls it briefly
//! takes the GIL back (at most every [`CHECK_INTERVAL`]) to let Python run its signal handlers. If a handler
//! raises (KeyboardInterrupt by default), the work stops with its bookkeeping consistent and that exception is
//! what the caller sees.

use std::time::{Duration, Instant};

use llama_sessions::Interrupt;
use pyo3::{PyErr, Python};

const CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// Checks Python's pending signals from native code running without the GIL.
pub struct SignalCheck {
    last_check: Instant,
    raised: Option<PyErr>,
}

impl SignalCheck {
    pub fn new() -> Self {
        SignalCheck {
            last_check: Instant::now(),
            raised: None,
        }
    }

    /// The exception a signal handler raised, if the work was interrupted.
    pub fn take_raised(&mut self) -> Option<PyErr> {
        self.raised.take()
    }
}

impl Interrupt for SignalCheck {
    fn should_stop(&mut self) -> bool {
        if self.raised.is_some() {
            return true;
        }
        if self.last_check.elapsed() < CHECK_INTERVAL {
            return false;
        }
        self.last_check = Instant::now();
        self.raised = Python::attach(|py| py.check_signals().err());
        self.raised.is_some()
    }
}
