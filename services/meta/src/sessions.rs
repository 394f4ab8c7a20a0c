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
    /// The term the node led in when it accepted the session: valid only while it still does.
    pub term: u64,
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

/// The leader's sessions in memory, by id.
#[derive(Default)]
pub(crate) struct Sessions(Mutex<HashMap<String, Pending>>);

impl Sessions {
    /// The sessions; a holder that panicked left each entry whole.
    pub fn lock(&self) -> MutexGuard<'_, HashMap<String, Pending>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sessions in memory of `owner` in `term`.
    pub fn count_of(map: &HashMap<String, Pending>, owner: &str, term: u64) -> usize {
        map.values().filter(|p| p.term == term && p.session.owner == owner).count()
    }
}
