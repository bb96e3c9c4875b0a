//! What may name a session (and a file), and the store keys of checkpoints.

use crate::error::{shorten_for_message, Error, Result};

/// Longest session id, in bytes.
pub const MAX_SESSION_ID_LEN: usize = 128;
/// Separates a session id from a checkpoint label in store keys (ids cannot contain it).
pub(super) const CHECKPOINT_SEPARATOR: char = '@';

/// Checks that `id` can name a session (and a file): 1 to 128 bytes, no `/`, `\`, `:` or `@`, no control
/// characters, not starting with a dot (so no `.`, `..`, hidden or temporary files), and neither starting nor
/// ending with whitespace (`"ada "` and `"ada"` would be two sessions that look alike).
pub fn validate_session_id(id: &str) -> Result<()> {
    validate_name("session_id", id)
}

/// Checks that `label` can name a checkpoint (the rules of session ids).
pub(super) fn validate_label(label: &str) -> Result<()> {
    validate_name("label", label)
}

fn validate_name(name: &'static str, id: &str) -> Result<()> {
    let reason = if id.is_empty() {
        Some("it is empty".to_owned())
    } else if id.len() > MAX_SESSION_ID_LEN {
        Some(format!("it is {} bytes long", id.len()))
    } else if let Some(c) = id
        .chars()
        .find(|&c| matches!(c, '/' | '\\' | ':' | CHECKPOINT_SEPARATOR) || c.is_control())
    {
        Some(format!("it contains {c:?}"))
    } else if id.starts_with('.') {
        Some("it starts with '.'".to_owned())
    } else if id.starts_with(char::is_whitespace) || id.ends_with(char::is_whitespace) {
        Some("it starts or ends with whitespace".to_owned())
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(Error::invalid(
            name,
            format!(
                "1 to {MAX_SESSION_ID_LEN} bytes without '/', '\\\\', ':', '@' or control characters, not \
                 starting with '.', not starting or ending with whitespace ({reason})"
            ),
            format!("{:?}", shorten_for_message(id)),
        )),
    }
}

/// The store key of checkpoint `label` of session `id`.
pub(super) fn checkpoint_key(id: &str, label: &str) -> String {
    format!("{id}{CHECKPOINT_SEPARATOR}{label}")
}

/// What the store keys of the checkpoints of session `id` start with.
pub(super) fn checkpoint_prefix(id: &str) -> String {
    format!("{id}{CHECKPOINT_SEPARATOR}")
}
