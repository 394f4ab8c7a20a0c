//! Upload sessions written behind: the leader keeps a new session in memory and writes it to
//! the log only once it has lasted [`WRITE_BEHIND`]. Most uploads (a layer pushed with one
//! PATCH) end well within that, and then the log gets one command for the whole upload, the
//! blob's link, instead of the session's creation and its end: two of a pushed image's nine
//! commands per blob became one, and every command is appended, replicated and applied on
//! every node of the group.
//!
//! A session in memory is the leader's, answered like a committed one (`upload`, the caller's
//! count of open uploads) for as long as this node leads in the term it was made in. What a
//! crash or a change of leader loses is sessions younger than [`WRITE_BEHIND`]: an upload
//! continued through the frontend that began it goes on (the frontend knows the session, and
//! a finish whose session is unknown links the blob all the same); one continued through
//! another frontend is unknown there, and the client starts that blob again, as after any
//! failed upload. A graceful stop and garbage collection write every session first.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use berth_core::store::Pusher;
use berth_core::UploadSession;

/// How long a session lives in the leader's memory before it is written to the log.
pub const WRITE_BEHIND: Duration = Duration::from_secs(1);

/// A session the leader accepted and has not written to the log yet.
pub(crate) struct Pending {
    pub session: UploadSession,
    pub pusher: Option<Pusher>,
    pub since: Instant,
    /// Set once the session is sent to the log: turns true when its write is over. Until
    /// then it is still counted here, and its end waits for it (see [`Pending::on_its_way`]).
    pub written: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Pending {
    /// Whether the session was sent to the log.
    pub fn on_its_way(&self) -> bool {
        self.written.is_some()
    }
}

/// Where a session to be ended is.
pub(crate) enum Found {
    /// In memory, taken out: it ends there.
    Taken(Pending),
    /// On its way to the log: its end is written once its creation is.
    Written(tokio::sync::watch::Receiver<bool>),
    /// Not in memory: on the log, or unknown.
    Elsewhere,
}

/// The sessions in memory, by id, and the term they were accepted in: all of one term, the
/// one this node led in when it accepted them.
#[derive(Default)]
pub(crate) struct Held {
    term: Option<u64>,
    map: HashMap<String, Pending>,
}

impl std::ops::Deref for Held {
    type Target = HashMap<String, Pending>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl std::ops::DerefMut for Held {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.map
    }
}

impl Held {
    /// Sessions in memory of `owner`.
    pub fn count_of(&self, owner: &str) -> usize {
        self.map.values().filter(|p| p.session.owner == owner).count()
    }
}

/// The leader's sessions in memory.
#[derive(Default)]
pub(crate) struct Sessions(Mutex<Held>);

impl Sessions {
    /// The sessions, whatever their term (a holder that panicked left each entry whole).
    pub fn lock(&self) -> MutexGuard<'_, Held> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The sessions of `term`, the one this node leads in (`None`: it does not lead): those of
    /// any other term are dropped first, being no longer this node's to answer for.
    pub fn of_term(&self, term: Option<u64>) -> MutexGuard<'_, Held> {
        let mut held = self.lock();
        if held.term != term {
            held.map.clear();
            held.term = term;
        }
        held
    }
}
