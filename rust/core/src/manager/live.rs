//! The live set and turn permits: the sessions loaded in memory, least recently used first, and the turns
//! that own them.
//!
//! Each live session has an occupancy: whether a turn holds it, whether it was chosen for eviction, whether it
//! left the live set. A turn (a chat, a streamed chat until it ends or is dropped, a generation, a revert)
//! holds the session's permit; eviction only chooses sessions without a turn and marks them, a turn or a
//! `load` claims a marked session back, and a turn that finds its session gone loads it again instead of
//! running on an orphan copy. So no session is ever evicted while a turn holds it.
//!
//! Lock order, outermost first. Bookkeeping locks, held for a few instructions and never across I/O,
//! generation or a wait: the live set, then a session's occupancy. Session locks: a turn permit (a state in
//! the occupancy, not a held mutex), then the session's record, then its context, then the store's lock of
//! its key. A bookkeeping lock may be taken while a session lock is held, never the other way round.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::records::Record;
use crate::context::{Context, Interrupt};
use crate::error::{Error, Result};
use crate::model::ChatMessage;
use crate::session::Metadata;

/// How often a wait for a turn polls the caller's [`Interrupt`] (Ctrl-C in Python).
const INTERRUPT_POLL: Duration = Duration::from_millis(20);

pub(super) use crate::sync::lock;

/// How long a call that needs a session's turn waits for the turn in progress to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TurnWait {
    /// Until it ends (a wait the caller's [`Interrupt`] can end).
    #[default]
    UntilFree,
    /// At most this long, then [`Error::SessionBusy`]; `Duration::ZERO` fails at once.
    AtMost(Duration),
}

impl TurnWait {
    /// When the wait runs out (None: never; so does a limit too long to represent).
    fn deadline(self) -> Option<Instant> {
        match self {
            TurnWait::UntilFree => None,
            TurnWait::AtMost(limit) => Instant::now().checked_add(limit),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Occupancy {
    /// A turn holds the session.
    in_turn: bool,
    /// Chosen as an eviction victim, not saved yet; a turn or a `load` may still claim it back.
    evicting: bool,
    /// Left the live set (evicted, deleted, replaced, or stale after a conflict); final.
    gone: bool,
}

/// A session loaded in memory: its context and its record.
pub struct ManagedSession {
    pub(super) id: String,
    pub(super) context: Arc<Mutex<Context>>,
    pub(super) record: Mutex<Record>,
    occupancy: Mutex<Occupancy>,
    occupancy_changed: Condvar,
}

impl std::fmt::Debug for ManagedSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedSession")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl ManagedSession {
    pub(super) fn new(id: &str, context: Context, record: Record) -> Arc<ManagedSession> {
        Arc::new(ManagedSession {
            id: id.to_owned(),
            context: Arc::new(Mutex::new(context)),
            record: Mutex::new(record),
            occupancy: Mutex::new(Occupancy::default()),
            occupancy_changed: Condvar::new(),
        })
    }

    /// The session id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The live context (shared: the manager generates on it too). Changes made through it are part of the
    /// session: they are saved with it, and on its eviction.
    pub fn context(&self) -> &Arc<Mutex<Context>> {
        &self.context
    }

    /// The conversation after the system prompt.
    pub fn history(&self) -> Vec<ChatMessage> {
        lock(&self.record)
            .manager
            .history
            .iter()
            .map(ChatMessage::from)
            .collect()
    }

    /// The system prompt the session started from.
    pub fn system_prompt(&self) -> Option<String> {
        lock(&self.record).manager.system_prompt.clone()
    }

    /// The user's metadata.
    pub fn metadata(&self) -> Metadata {
        lock(&self.record).user_metadata.clone()
    }

    /// The stored version this live copy derives from (0: not stored yet).
    pub fn stored_version(&self) -> u64 {
        lock(&self.record).stored_version()
    }

    /// Whether it is still marked for eviction (no turn or `load` claimed it back).
    pub(super) fn is_being_evicted(&self) -> bool {
        let occupancy = lock(&self.occupancy);
        occupancy.evicting && !occupancy.gone
    }

    /// Changes the occupancy and wakes the turns waiting for it.
    fn update(
        &self,
        occupancy: &mut MutexGuard<'_, Occupancy>,
        change: impl FnOnce(&mut Occupancy),
    ) {
        change(occupancy);
        self.occupancy_changed.notify_all();
    }
}

/// The right to run a turn on a session: held from the start of a turn to its end, released when dropped.
#[derive(Debug)]
pub(super) struct TurnPermit {
    session: Arc<ManagedSession>,
}

impl TurnPermit {
    /// Waits (as `wait` allows, polling `interrupt`) until no other turn holds `session`, and takes it.
    /// `Ok(None)`: the session left the live set; load it again.
    pub(super) fn acquire(
        session: &Arc<ManagedSession>,
        wait: TurnWait,
        interrupt: &mut dyn Interrupt,
    ) -> Result<Option<TurnPermit>> {
        let deadline = wait.deadline();
        loop {
            {
                let mut occupancy = lock(&session.occupancy);
                if let Some(claimed) = Self::claim(session, &mut occupancy) {
                    return Ok(claimed);
                }
                let now = Instant::now();
                let slice = match deadline {
                    Some(deadline) if deadline <= now => {
                        return Err(Error::SessionBusy {
                            id: session.id.clone(),
                        })
                    }
                    Some(deadline) => (deadline - now).min(INTERRUPT_POLL),
                    None => INTERRUPT_POLL,
                };
                occupancy = session
                    .occupancy_changed
                    .wait_timeout(occupancy, slice)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
                if let Some(claimed) = Self::claim(session, &mut occupancy) {
                    return Ok(claimed);
                }
            }
            // Polled without the occupancy lock: in Python the check takes the GIL.
            if interrupt.should_stop() {
                return Err(Error::Interrupted);
            }
        }
    }

    /// The permit if `session` is free (a session being evicted is claimed back: it stays live); `Some(None)`
    /// if it is gone; `None` if a turn holds it.
    fn claim(
        session: &Arc<ManagedSession>,
        occupancy: &mut MutexGuard<'_, Occupancy>,
    ) -> Option<Option<TurnPermit>> {
        if occupancy.gone {
            return Some(None);
        }
        if occupancy.in_turn {
            return None;
        }
        session.update(occupancy, |o| {
            o.in_turn = true;
            o.evicting = false;
        });
        Some(Some(TurnPermit {
            session: Arc::clone(session),
        }))
    }

    pub(super) fn session(&self) -> &Arc<ManagedSession> {
        &self.session
    }
}

impl Drop for TurnPermit {
    fn drop(&mut self) {
        // What the turn reserved of a pool's shared cache and did not use goes back to the others. (Not
        // waited for: a thread that drops the permit while it holds the context keeps the reservation until
        // the session's next turn or eviction.)
        if let Ok(context) = self.session.context.try_lock() {
            context.release_pool_cells();
        }
        let mut occupancy = lock(&self.session.occupancy);
        self.session.update(&mut occupancy, |o| o.in_turn = false);
    }
}

/// The live sessions, least recently used first, and the choice of eviction victims.
#[derive(Debug)]
pub(super) struct LiveSet {
    sessions: Mutex<Vec<Arc<ManagedSession>>>,
    max_live: usize,
}

impl LiveSet {
    pub(super) fn new(max_live: usize) -> LiveSet {
        LiveSet {
            sessions: Mutex::new(Vec::new()),
            max_live,
        }
    }

    pub(super) fn max_live(&self) -> usize {
        self.max_live
    }

    /// Live session `id`, now the most recently used; one being evicted is claimed back (it stays live).
    pub(super) fn find(&self, id: &str) -> Option<Arc<ManagedSession>> {
        let mut sessions = lock(&self.sessions);
        let index = sessions.iter().position(|s| s.id == id)?;
        let session = sessions.remove(index);
        sessions.push(Arc::clone(&session));
        let mut occupancy = lock(&session.occupancy);
        if occupancy.evicting {
            session.update(&mut occupancy, |o| o.evicting = false);
        }
        drop(occupancy);
        Some(session)
    }

    /// Makes `session` the most recently used, if it is still live.
    pub(super) fn touch(&self, session: &Arc<ManagedSession>) {
        let mut sessions = lock(&self.sessions);
        if let Some(index) = sessions.iter().position(|s| Arc::ptr_eq(s, session)) {
            let session = sessions.remove(index);
            sessions.push(session);
        }
    }

    pub(super) fn contains(&self, id: &str) -> bool {
        lock(&self.sessions).iter().any(|s| s.id == id)
    }

    pub(super) fn ids(&self) -> Vec<String> {
        lock(&self.sessions).iter().map(|s| s.id.clone()).collect()
    }

    pub(super) fn sessions(&self) -> Vec<Arc<ManagedSession>> {
        lock(&self.sessions).clone()
    }

    /// Adds `session` as the most recently used (or returns the copy of its id another thread added first)
    /// and picks the sessions to evict.
    pub(super) fn insert(
        &self,
        session: Arc<ManagedSession>,
    ) -> (Arc<ManagedSession>, Vec<Arc<ManagedSession>>) {
        let mut sessions = lock(&self.sessions);
        if let Some(existing) = sessions.iter().find(|s| s.id == session.id) {
            return (Arc::clone(existing), Vec::new());
        }
        sessions.push(Arc::clone(&session));
        let victims = self.choose_victims(&sessions);
        (session, victims)
    }

    /// Picks the sessions to evict to get back to `max_live`.
    pub(super) fn victims(&self) -> Vec<Arc<ManagedSession>> {
        let sessions = lock(&self.sessions);
        self.choose_victims(&sessions)
    }

    /// Picks the sessions to evict to make room for one more below `max_live` (a session about to be loaded
    /// or created needs a sequence of the manager's pool); the most recently used may go too.
    pub(super) fn victims_for_one_more(&self) -> Vec<Arc<ManagedSession>> {
        let sessions = lock(&self.sessions);
        let leaving = sessions.iter().filter(|s| s.is_being_evicted()).count();
        let excess = (sessions.len() + 1).saturating_sub(self.max_live + leaving);
        Self::mark_victims(&sessions, excess)
    }

    /// Picks the least recently used idle session (none of `except`) whose context holds cells of a pool's
    /// shared cache, to make room in that cache; none if every such session is in a turn or in use.
    pub(super) fn victim_holding_cells(
        &self,
        except: &[Weak<ManagedSession>],
    ) -> Vec<Arc<ManagedSession>> {
        let sessions = lock(&self.sessions);
        for session in sessions.iter() {
            if except.iter().any(|e| e.as_ptr() == Arc::as_ptr(session)) {
                continue;
            }
            let mut occupancy = lock(&session.occupancy);
            if occupancy.in_turn || occupancy.evicting {
                continue;
            }
            let holds_cells = match session.context.try_lock() {
                Ok(context) => context.holds_pool_cells(),
                Err(_) => continue, // in use
            };
            if holds_cells {
                session.update(&mut occupancy, |o| o.evicting = true);
                return vec![Arc::clone(session)];
            }
        }
        Vec::new()
    }

    /// Least recently used first, among idle sessions whose context is not in use (never the most recently
    /// used one): marked as being evicted, they stay in the set until they are saved
    /// ([`LiveSet::finish_eviction`]). Sessions in a turn or in use are skipped, so the set may exceed
    /// `max_live` until they are idle.
    fn choose_victims(&self, sessions: &[Arc<ManagedSession>]) -> Vec<Arc<ManagedSession>> {
        let leaving = sessions.iter().filter(|s| s.is_being_evicted()).count();
        let excess = sessions.len().saturating_sub(self.max_live + leaving);
        let all_but_the_most_recent = &sessions[..sessions.len().saturating_sub(1)];
        Self::mark_victims(all_but_the_most_recent, excess)
    }

    /// Marks up to `excess` idle sessions of `candidates` (least recently used first) as being evicted.
    fn mark_victims(
        candidates: &[Arc<ManagedSession>],
        mut excess: usize,
    ) -> Vec<Arc<ManagedSession>> {
        let mut victims = Vec::new();
        for session in candidates {
            if excess == 0 {
                break;
            }
            let mut occupancy = lock(&session.occupancy);
            let in_use = session.context.try_lock().is_err();
            if occupancy.in_turn || occupancy.evicting || in_use {
                continue;
            }
            session.update(&mut occupancy, |o| o.evicting = true);
            victims.push(Arc::clone(session));
            excess -= 1;
        }
        victims
    }

    /// Ends the eviction of `victim`: it leaves the set if it is still marked (nobody claimed it back) and
    /// was `saved`; if it could not be saved, it stays, idle. Returns whether it left.
    pub(super) fn finish_eviction(&self, victim: &Arc<ManagedSession>, saved: bool) -> bool {
        let mut sessions = lock(&self.sessions);
        let mut occupancy = lock(&victim.occupancy);
        if !occupancy.evicting || occupancy.gone {
            return false;
        }
        if !saved {
            victim.update(&mut occupancy, |o| o.evicting = false);
            return false;
        }
        sessions.retain(|s| !Arc::ptr_eq(s, victim));
        victim.update(&mut occupancy, |o| {
            o.evicting = false;
            o.gone = true;
        });
        true
    }

    /// Removes `session` from the set for good (a turn waiting for it then loads the session again).
    pub(super) fn retire(&self, session: &Arc<ManagedSession>) {
        let mut sessions = lock(&self.sessions);
        sessions.retain(|s| !Arc::ptr_eq(s, session));
        let mut occupancy = lock(&session.occupancy);
        session.update(&mut occupancy, |o| o.gone = true);
    }

    /// Removes session `id` from the set; whether it was there.
    pub(super) fn retire_id(&self, id: &str) -> bool {
        let session = lock(&self.sessions).iter().find(|s| s.id == id).cloned();
        match session {
            Some(session) => {
                self.retire(&session);
                true
            }
            None => false,
        }
    }
}
