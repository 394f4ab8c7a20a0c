//! What the metadata service answered to pulls by digest, kept so that the same pulls go on
//! while it cannot answer (no majority, or out of reach).
//!
//! Content by digest never changes, so a remembered answer ("this blob is linked in this
//! repository, this size"; "this manifest is in this repository, this record") stays true
//! until someone deletes it. The metadata service is still asked first on every pull, so a
//! deletion is seen at once while it answers (and a deletion through this frontend forgets the
//! answer at once); a remembered answer is used only when it does not answer in time or
//! answers 503. After such a failure, pulls wait a much shorter time for a while, so that a
//! pull of many blobs does not wait a second per blob.
//! What the frontend never saw, it cannot answer without the metadata service: such pulls fail
//! with the service's 503.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use berth_core::error::Result;
use berth_core::{Digest, ManifestRecord};

/// How long a pull whose answer is remembered waits for the metadata service: more than a
/// leader change takes when a majority is up.
const WAIT: Duration = Duration::from_secs(1);

/// After the metadata service failed to answer, for how long pulls wait only [`QUIET_WAIT`].
const QUIET: Duration = Duration::from_secs(2);

/// How long a pull whose answer is remembered waits while the metadata service has just failed.
const QUIET_WAIT: Duration = Duration::from_millis(100);

/// Remembered answers at most (each a few hundred bytes).
const CAPACITY: usize = 65_536;

/// One remembered answer.
#[derive(Clone)]
enum Answer {
    /// The blob is linked in the repository with this size.
    Blob(u64),
    /// The manifest is in the repository.
    Manifest(ManifestRecord),
}

/// The remembered answers and whether the metadata service is answering.
pub struct Recall {
    /// `None` where nothing is remembered: every answer is the metadata service's.
    answers: Option<quick_cache::sync::Cache<(u8, String, Digest), Answer>>,
    quiet_until: Mutex<Option<Instant>>,
}

impl Recall {
    /// Answers that remember (`enabled`), or that only ask.
    pub fn new(enabled: bool) -> Recall {
        Recall { answers: enabled.then(|| quick_cache::sync::Cache::new(CAPACITY)), quiet_until: Mutex::new(None) }
    }
}

/// Whether an error means the metadata service did not answer (as opposed to an answer).
fn unanswered(e: &berth_core::RegistryError) -> bool {
    e.status == 503
}

impl Recall {
    fn quiet(&self) -> bool {
        self.quiet_until.lock().ok().and_then(|q| *q).is_some_and(|t| Instant::now() < t)
    }

    fn failed(&self) {
        if let Ok(mut q) = self.quiet_until.lock() {
            *q = Some(Instant::now() + QUIET);
        }
    }

    /// The size of `digest` as linked in `repo`, from `ask` (the metadata service) or, when
    /// it does not answer, as remembered.
    pub async fn blob_link(
        &self,
        repo: &str,
        digest: &Digest,
        ask: impl Future<Output = Result<Option<u64>>>,
    ) -> Result<Option<u64>> {
        let answer = self.answer(b'b', repo, digest, async { Ok(ask.await?.map(Answer::Blob)) }).await?;
        Ok(answer.and_then(|a| match a {
            Answer::Blob(size) => Some(size),
            Answer::Manifest(_) => None,
        }))
    }

    /// The record of manifest `digest` in `repo`, from `ask` (the metadata service) or, when
    /// it does not answer, as remembered.
    pub async fn manifest(
        &self,
        repo: &str,
        digest: &Digest,
        ask: impl Future<Output = Result<Option<ManifestRecord>>>,
    ) -> Result<Option<ManifestRecord>> {
        let answer = self.answer(b'm', repo, digest, async { Ok(ask.await?.map(Answer::Manifest)) }).await?;
        Ok(answer.and_then(|a| match a {
            Answer::Manifest(r) => Some(r),
            Answer::Blob(_) => None,
        }))
    }

    /// Forgets what was remembered of `digest` in `repo` (it was deleted through this frontend).
    pub fn forget(&self, repo: &str, digest: &Digest) {
        let Some(answers) = &self.answers else { return };
        for kind in [b'b', b'm'] {
            answers.remove(&(kind, repo.to_string(), digest.clone()));
        }
    }

    /// The answer from `ask`, or the one remembered under `kind`, `repo` and `digest` when
    /// the metadata service does not answer.
    async fn answer<F>(&self, kind: u8, repo: &str, digest: &Digest, ask: F) -> Result<Option<Answer>>
    where
        F: Future<Output = Result<Option<Answer>>>,
    {
        let Some(answers) = &self.answers else { return ask.await };
        let key = (kind, repo.to_string(), digest.clone());
        let Some(known) = answers.get(&key) else {
            let answer = ask.await.inspect_err(|e| {
                if unanswered(e) {
                    self.failed();
                }
            })?;
            if let Some(a) = &answer {
                answers.insert(key, a.clone());
            }
            return Ok(answer);
        };
        let wait = if self.quiet() { QUIET_WAIT } else { WAIT };
        match tokio::time::timeout(wait, ask).await {
            Ok(Ok(answer)) => {
                match &answer {
                    Some(a) => answers.insert(key, a.clone()),
                    None => {
                        answers.remove(&key);
                    }
                }
                Ok(answer)
            }
            Ok(Err(e)) if !unanswered(&e) => Err(e),
            Ok(Err(_)) | Err(_) => {
                self.failed();
                Ok(Some(known))
            }
        }
    }
}
