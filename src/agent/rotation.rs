//! Rotation inside the agent: the `[rotation]` schedule and the watch, one background task.
//!
//! Every `check` (default 30 s) the task
//! 1. reads the rotation record of every slot the agent uses (the clients' keys, the keys
//!    in its cache, the scheduled slots) and, when a record's `seq` changed (a step by this
//!    agent, by `keybound keys rotate` in another process, or by another agent on the same
//!    token), calls [`Agent::rotation_changed`]: the agent signs with the active generation
//!    from then on, without a restart;
//! 2. for each scheduled slot (`slots`, else every client's `assertion_key` and `dpop_key`,
//!    those whose `interval` is set) takes the step that is due:
//!    * prepare: when the active generation has been active for `interval - publish_lead`
//!      (a slot never rotated counts from the agent's start); a generation left `pending`
//!      by a prepare that stopped half-way is finished after `PENDING_GRACE`;
//!    * activate: when the prepared generation has been published for `publish_lead`; only
//!      after every client whose assertions the slot signs got a token with the prepared
//!      key (`rotation::activate`, never forced);
//!    * retire: when the retiring generation has been retiring for `retire_after` (and no
//!      token bound to it is held).
//!
//!    It never destroys. A step that fails is retried with exponential backoff (from
//!    `check`, doubling, at most 1 h) and said in the log, `/metrics` and `/healthz`. A
//!    step another process took first (two agents sharing a token both run the schedule)
//!    is normal: logged at info, the record read again next time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::{Value, json};

use super::Agent;
use crate::jose::unix_now;
use crate::keyring::KeyError;
use crate::keyring::rotation::{GenState, Rotation, RotationError};
use crate::rotation::{RotationSettings, Schedule, StepError};
use crate::token::TokenError;

/// The longest wait between two attempts of a failing step.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// Seconds a generation stays `pending` before the schedule finishes its preparation: a
/// prepare by another process (an agent sharing the token, `keybound keys rotate`) takes
/// far less, so only a prepare that stopped half-way is resumed.
const PENDING_GRACE: u64 = 60;

/// A step of the schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    Prepare,
    Activate,
    Retire,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Prepare => "prepare",
            Step::Activate => "activate",
            Step::Retire => "retire",
        }
    }
}

/// One attempt of a step: when (Unix seconds), and the error if it failed.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub at: u64,
    pub error: Option<String>,
}

/// What the agent knows of one slot, for `/metrics` and `/healthz`.
#[derive(Clone, Debug, Default)]
pub struct SlotStatus {
    /// The schedule runs on this slot.
    pub scheduled: bool,
    /// The record as last read (`None`: never rotated).
    pub record: Option<Rotation>,
    /// Why the last read of the record failed, if it did.
    pub read_error: Option<String>,
    /// The next step of the schedule and when it is due (Unix seconds).
    pub next: Option<(Step, u64)>,
    /// Why the due step waits (another process's step, a generation too young, a token
    /// bound to the retiring key).
    pub waiting: Option<String>,
    /// The last attempt of each step.
    pub last: BTreeMap<Step, Attempt>,
    /// Failed attempts of each step since the start.
    pub failures: BTreeMap<Step, u64>,
    /// Per failing step: its consecutive failures and when it may be tried again.
    backoff: BTreeMap<Step, (u32, u64)>,
}

/// The rotation state of every slot the agent uses.
#[derive(Default)]
pub struct Status {
    slots: Mutex<BTreeMap<String, SlotStatus>>,
}

impl Status {
    /// A copy of every slot's status.
    pub fn snapshot(&self) -> BTreeMap<String, SlotStatus> {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn update<R>(&self, slot: &str, f: impl FnOnce(&mut SlotStatus) -> R) -> R {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        f(slots.entry(slot.to_owned()).or_default())
    }

    /// The `rotation` object of `/healthz`: per slot, the active kid, each generation's
    /// state, the next step and when, the last error.
    pub fn health(&self) -> Value {
        let slots = self.snapshot();
        let mut out = serde_json::Map::new();
        for (slot, s) in &slots {
            let generations: Vec<Value> = s
                .record
                .iter()
                .flat_map(|r| r.generations.iter())
                .filter(|g| g.state != GenState::Destroyed)
                .map(|g| json!({ "generation": g.n, "kid": g.kid, "state": g.state.name() }))
                .collect();
            let last_error = s
                .last
                .iter()
                .filter_map(|(step, a)| a.error.as_ref().map(|e| (step, a.at, e)))
                .max_by_key(|(_, at, _)| *at)
                .map(|(step, at, e)| json!({ "step": step.name(), "at": at, "message": e }));
            out.insert(
                slot.clone(),
                json!({
                    "scheduled": s.scheduled,
                    "active_kid": s.record.as_ref().and_then(|r| r.active()).and_then(|g| g.kid.clone()),
                    "seq": s.record.as_ref().map(|r| r.seq),
                    "generations": generations,
                    "next_step": s.next.map(|(step, at)| json!({ "step": step.name(), "at": at })),
                    "waiting": s.waiting,
                    "last_error": last_error,
                    "read_error": s.read_error,
                }),
            );
        }
        Value::Object(out)
    }
}

/// Starts the schedule and the watch on the agent's runtime; abort the handle to stop it.
pub fn spawn(agent: Arc<Agent>, settings: RotationSettings) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut runner = Runner {
            started: unix_now(),
            seqs: BTreeMap::new(),
            agent,
            settings,
        };
        let mut tick = tokio::time::interval(runner.settings.check_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            runner.once().await;
        }
    })
}

struct Runner {
    agent: Arc<Agent>,
    settings: RotationSettings,
    /// When the agent started: a slot never rotated counts its interval from here.
    started: u64,
    /// The `seq` of each slot's record at the last read (`None`: no record).
    seqs: BTreeMap<String, Option<u64>>,
}

/// What became of a step that did not happen.
enum Missed {
    /// Another process took a step, or the step is not due yet by the keyring's rules:
    /// read the record again next time.
    Wait(String),
    /// A real failure: retried with backoff, counted in the metrics.
    Failed(String),
}

impl Runner {
    /// The slots the schedule rotates: `slots`, else every client's keys, each only when
    /// its `interval` is set.
    fn scheduled(&self) -> BTreeSet<String> {
        let names: Vec<String> = match &self.settings.slots {
            Some(slots) => slots.clone(),
            None => self
                .agent
                .access
                .every_client()
                .flat_map(|c| {
                    std::iter::once(c.config().assertion_key.clone())
                        .chain(c.config().dpop_key.clone())
                })
                .collect(),
        };
        names
            .into_iter()
            .filter(|s| !s.starts_with("pkcs11:"))
            .filter(|s| self.settings.schedule(s).interval.is_some())
            .collect()
    }

    /// The slots whose records the agent watches: the scheduled ones, the clients' keys
    /// and the keys in its cache.
    fn watched(&self, scheduled: &BTreeSet<String>) -> BTreeSet<String> {
        let mut slots = scheduled.clone();
        for c in self.agent.access.every_client() {
            slots.insert(c.assertion_key().name().to_owned());
            if let Some(k) = c.dpop_key() {
                slots.insert(k.name().to_owned());
            }
        }
        slots.extend(self.agent.access.cached_slots());
        slots.retain(|s| !s.starts_with("pkcs11:"));
        slots
    }

    async fn once(&mut self) {
        let scheduled = self.scheduled();
        let watched = self.watched(&scheduled);
        for slot in &scheduled {
            self.agent.rotation.update(slot, |s| s.scheduled = true);
        }
        let records = self.read(&watched).await;
        self.notice(&records).await;
        let mut stepped = false;
        for slot in &scheduled {
            if let Some(Ok(record)) = records.get(slot) {
                stepped |= self.step(slot, record.as_ref()).await;
            }
        }
        if stepped {
            // The agent's own step: signing follows it now, not a check later.
            let records = self.read(&watched).await;
            self.notice(&records).await;
            for slot in &scheduled {
                if let Some(Ok(record)) = records.get(slot) {
                    let next = plan(self.settings.schedule(slot), self.started, record.as_ref())
                        .into_iter()
                        .min_by_key(|(_, at)| *at);
                    self.agent.rotation.update(slot, |s| s.next = next);
                }
            }
        }
    }

    /// Each slot's record, read off the reactor.
    async fn read(
        &self,
        slots: &BTreeSet<String>,
    ) -> BTreeMap<String, Result<Option<Rotation>, String>> {
        let keyring = self.agent.access.own_keyring().clone();
        let slots = slots.clone();
        match tokio::task::spawn_blocking(move || {
            slots
                .into_iter()
                .map(|s| {
                    let r = keyring.rotation(&s).map_err(|e| e.to_string());
                    (s, r)
                })
                .collect()
        })
        .await
        {
            Ok(records) => records,
            Err(e) => {
                tracing::warn!("reading the rotation records stopped: {e}");
                BTreeMap::new()
            }
        }
    }

    /// Remembers each record; when a slot's `seq` changed since the last read, the agent
    /// looks its keys up again.
    async fn notice(&mut self, records: &BTreeMap<String, Result<Option<Rotation>, String>>) {
        let mut changed = Vec::new();
        for (slot, read) in records {
            match read {
                Ok(record) => {
                    let seq = record.as_ref().map(|r| r.seq);
                    if let Some(before) = self.seqs.insert(slot.clone(), seq)
                        && before != seq
                    {
                        changed.push((slot, record));
                    }
                    self.agent.rotation.update(slot, |s| {
                        s.record = record.clone();
                        s.read_error = None;
                    });
                }
                Err(e) => {
                    let new = self.agent.rotation.update(slot, |s| {
                        let new = s.read_error.as_deref() != Some(e.as_str());
                        s.read_error = Some(e.clone());
                        new
                    });
                    if new {
                        tracing::warn!(slot = %slot, "cannot read the rotation record: {e}");
                    }
                }
            }
        }
        if changed.is_empty() {
            return;
        }
        self.agent.rotation_changed().await;
        for (slot, record) in changed {
            let active = record.as_ref().and_then(|r| r.active());
            tracing::info!(
                slot = %slot,
                seq = record.as_ref().map(|r| r.seq),
                generation = active.map(|g| g.n),
                kid = active.and_then(|g| g.kid.as_deref()),
                state = record.as_ref().map(Rotation::summary).unwrap_or_default(),
                "rotation record changed; the agent signs with the active generation"
            );
        }
    }

    /// Takes the steps of `slot` that are due; `true` if one was taken.
    async fn step(&mut self, slot: &str, record: Option<&Rotation>) -> bool {
        let now = unix_now();
        let plan = plan(self.settings.schedule(slot), self.started, record);
        let retry = self.agent.rotation.update(slot, |s| {
            s.next = plan.iter().copied().min_by_key(|(_, at)| *at);
            s.backoff.clone()
        });
        let mut stepped = false;
        for (step, due) in plan {
            if due > now {
                continue;
            }
            if let Some((_, until)) = retry.get(&step).copied()
                && until > now
            {
                self.agent
                    .rotation
                    .update(slot, |s| s.next = Some((step, until)));
                continue;
            }
            match self.take(slot, step).await {
                Ok(()) => {
                    stepped = true;
                    self.agent.rotation.update(slot, |s| {
                        s.last.insert(
                            step,
                            Attempt {
                                at: now,
                                error: None,
                            },
                        );
                        s.backoff.remove(&step);
                        s.waiting = None;
                    });
                }
                Err(Missed::Wait(reason)) => {
                    // Said once when the wait starts, not at every check.
                    let first = self.agent.rotation.update(slot, |s| {
                        s.backoff.remove(&step);
                        s.waiting.replace(reason.clone()).is_none()
                    });
                    if first {
                        tracing::info!(slot, step = step.name(), "rotation step waits: {reason}");
                    } else {
                        tracing::debug!(slot, step = step.name(), "rotation step waits: {reason}");
                    }
                }
                Err(Missed::Failed(reason)) => {
                    let start = self.settings.check_every();
                    let (n, delay) = self.agent.rotation.update(slot, |s| {
                        let n = s.backoff.get(&step).map_or(1, |(n, _)| n.saturating_add(1));
                        let delay = backoff(start, n);
                        s.backoff.insert(step, (n, now.saturating_add(delay)));
                        s.next = Some((step, now.saturating_add(delay)));
                        s.last.insert(
                            step,
                            Attempt {
                                at: now,
                                error: Some(reason.clone()),
                            },
                        );
                        *s.failures.entry(step).or_default() += 1;
                        s.waiting = None;
                        (n, delay)
                    });
                    tracing::warn!(
                        slot,
                        step = step.name(),
                        failures = n,
                        retry_in_secs = delay,
                        "rotation step failed, retried with backoff: {reason}"
                    );
                }
            }
        }
        stepped
    }

    /// One step on the device (and, to activate, the proof against the servers).
    async fn take(&self, slot: &str, step: Step) -> Result<(), Missed> {
        let keyring = self.agent.access.own_keyring().clone();
        let sched = self.settings.schedule(slot);
        let owned = slot.to_owned();
        let blocking = |what: &'static str, e: tokio::task::JoinError| {
            Missed::Failed(
                StepError::Stopped {
                    what,
                    reason: e.to_string(),
                }
                .to_string(),
            )
        };
        match step {
            Step::Prepare => {
                let p = tokio::task::spawn_blocking(move || keyring.prepare(&owned))
                    .await
                    .map_err(|e| blocking("the preparation", e))?
                    .map_err(|e| missed(StepError::Key(e)))?;
                tracing::warn!(
                    slot,
                    generation = p.generation.n,
                    kid = p.generation.kid.as_deref(),
                    resumed = p.resumed,
                    publish_lead_secs = sched.publish_lead.as_secs(),
                    "key generation prepared: published in the JWKS, activated after publish_lead once the servers accept it"
                );
            }
            Step::Activate => {
                let clients: Vec<_> = self.agent.access.every_client().collect();
                let (rotation, accepted) =
                    crate::rotation::activate(&keyring, &clients, slot, false)
                        .await
                        .map_err(missed)?;
                let active = rotation.active();
                tracing::warn!(
                    slot,
                    generation = active.map(|g| g.n),
                    kid = accepted.kid(),
                    proven_by = ?accepted.clients(),
                    "key generation activated by the schedule"
                );
            }
            Step::Retire => {
                let secs = sched.retire_after.as_secs();
                let rotation =
                    tokio::task::spawn_blocking(move || keyring.retire(&owned, secs, false))
                        .await
                        .map_err(|e| blocking("the retirement", e))?
                        .map_err(|e| missed(StepError::Key(e)))?;
                for g in rotation.in_state(GenState::Retired) {
                    if g.retired == rotation.generations.iter().filter_map(|g| g.retired).max() {
                        tracing::warn!(
                            slot,
                            generation = g.n,
                            kid = g.kid.as_deref(),
                            "key generation retired: no longer published (still on the device; `keybound keys destroy` deletes it)"
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

/// The steps of a slot with schedule `sched` and when each is due (Unix seconds); a slot
/// without a record counts from `started`.
fn plan(sched: Schedule, started: u64, record: Option<&Rotation>) -> Vec<(Step, u64)> {
    let Some(interval) = sched.interval else {
        return Vec::new();
    };
    let (lead, retire_after) = (sched.publish_lead.as_secs(), sched.retire_after.as_secs());
    let every = interval.as_secs().saturating_sub(lead);
    let Some(r) = record else {
        return vec![(Step::Prepare, started.saturating_add(every))];
    };
    let mut plan = Vec::new();
    if let Some(since) = r
        .in_state(GenState::Retiring)
        .map(|g| g.retiring_since.unwrap_or(g.created))
        .max()
    {
        plan.push((Step::Retire, since.saturating_add(retire_after)));
    }
    if let Some(g) = r.in_state(GenState::Pending).next() {
        // A prepare that stopped half-way (a crash), or one another process is taking
        // right now: finished once it has been pending for PENDING_GRACE, so that this
        // agent does not generate a second key for a generation another one is making.
        plan.push((Step::Prepare, g.created.saturating_add(PENDING_GRACE)));
    } else if let Some(p) = r.in_state(GenState::Prepared).next() {
        plan.push((
            Step::Activate,
            p.prepared.unwrap_or(p.created).saturating_add(lead),
        ));
    } else {
        let since = r
            .active()
            .map_or(started, |g| g.activated.unwrap_or(g.created));
        plan.push((Step::Prepare, since.saturating_add(every)));
    }
    plan
}

/// Seconds before the `n`th consecutive failure (n >= 1) is retried: `start`, doubling,
/// at most [`MAX_BACKOFF`].
fn backoff(start: Duration, n: u32) -> u64 {
    start
        .saturating_mul(2u32.saturating_pow(n.saturating_sub(1)))
        .min(MAX_BACKOFF)
        .as_secs()
}

/// Whether a step that did not happen is another process's doing or a rule of the keyring
/// that only time lifts (wait), or a failure.
fn missed(e: StepError) -> Missed {
    let text = e.to_string();
    match &e {
        StepError::Key(KeyError::Token(TokenError::RecordConflict { .. }))
        | StepError::Key(KeyError::Rotation(
            RotationError::InProgress { .. }
            | RotationError::NothingPrepared { .. }
            | RotationError::NothingRetiring { .. }
            | RotationError::WrongProof { .. }
            | RotationError::TooYoung { .. }
            | RotationError::TokensBound { .. },
        )) => Missed::Wait(text),
        _ => Missed::Failed(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::rotation::Generation;

    fn gen_(n: u32, state: GenState, created: u64) -> Generation {
        Generation {
            n,
            label: format!("s#{n}"),
            state,
            id: None,
            kid: Some(format!("kid{n}")),
            created,
            prepared: None,
            activated: None,
            retiring_since: None,
            retired: None,
            destroyed: None,
            tokens_until: None,
        }
    }

    fn record(generations: Vec<Generation>) -> Rotation {
        Rotation {
            version: 1,
            slot: "s".into(),
            seq: 3,
            alg: crate::jose::Alg::ES256,
            generations,
        }
    }

    const SCHED: Schedule = Schedule {
        interval: Some(Duration::from_secs(100)),
        publish_lead: Duration::from_secs(10),
        retire_after: Duration::from_secs(20),
    };

    #[test]
    fn the_plan_follows_the_generations() {
        // Never rotated: counts from the agent's start.
        assert_eq!(plan(SCHED, 1000, None), [(Step::Prepare, 1090)]);
        // No interval: nothing.
        let off = Schedule {
            interval: None,
            ..SCHED
        };
        assert!(plan(off, 1000, None).is_empty());
        // Active since 2000: the next one is prepared publish_lead before interval ends.
        let mut active = gen_(2, GenState::Active, 1500);
        active.activated = Some(2000);
        assert_eq!(
            plan(SCHED, 0, Some(&record(vec![active.clone()]))),
            [(Step::Prepare, 2090)]
        );
        // Prepared at 2090: activated publish_lead later; the retiring one after retire_after.
        let mut prepared = gen_(3, GenState::Prepared, 2089);
        prepared.prepared = Some(2090);
        let mut retiring = gen_(1, GenState::Retiring, 1000);
        retiring.retiring_since = Some(2000);
        assert_eq!(
            plan(
                SCHED,
                0,
                Some(&record(vec![retiring, active.clone(), prepared]))
            ),
            [(Step::Retire, 2020), (Step::Activate, 2100)]
        );
        // A prepare that stopped half-way is finished, once no other process can still
        // be making its key.
        let pending = gen_(3, GenState::Pending, 2089);
        assert_eq!(
            plan(SCHED, 0, Some(&record(vec![active, pending]))),
            [(Step::Prepare, 2089 + PENDING_GRACE)]
        );
    }

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        let s = Duration::from_secs(30);
        assert_eq!(
            (1..=9).map(|n| backoff(s, n)).collect::<Vec<_>>(),
            [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]
        );
        assert_eq!(backoff(s, u32::MAX), 3600);
    }
}
