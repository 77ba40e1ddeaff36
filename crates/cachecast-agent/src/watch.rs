//! The agent watching itself: whether it keeps up with its environment's events, whether the
//! stream lost events it never saw (recreated, or dropped by its limits), whether its presence
//! is fresh. These checks run in their own tasks: an eviction that takes up to
//! `agent.evict_timeout` in the event loop never delays them, and they rely on nothing the
//! NATS client reports about its consumer.
//!
//! The progress check reads, once a heartbeat, the stream's state and the last event of the
//! agent's environment (a direct get, last by subject), and compares them with the last event
//! the event loop handled ([`Tracker`], pure). A stream shared by several environments skips
//! sequence numbers all the time, so the tracker keeps a *scan position*: a stream sequence up
//! to which every event of the environment is known to be handled.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::stream;
use cachecast_proto::EnvId;
use tokio::sync::mpsc;

use crate::backend::CacheBackend;
use crate::consumer::{StreamState, missed_events};
use crate::presence::Progress;

/// Why the cache may hold entries whose events the agent will never receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gap {
    /// The stream is another one than the position counts in (deleted and created anew, a
    /// store lost), or its sequence went back.
    StreamRecreated,
    /// The stream dropped events (its `max_age`, `max_msgs` or `max_bytes`) that the agent may
    /// not have received.
    Retention,
}

impl Gap {
    /// The flush reason it is counted under.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::StreamRecreated => "stream_recreated",
            Self::Retention => "retention",
        }
    }
}

/// What the progress check tells the event loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    /// Flush and carry on from the stream's end.
    Gap(Gap),
    /// The consumer delivers nothing: recreate it after the last event handled.
    Stalled,
    /// An event the agent has not handled has been in the stream since the last look: on
    /// live copies, one may have been lost with no later one to show it.
    Behind,
}

/// One look at the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Observation {
    /// The stream's state, read before `last_of_env`.
    pub(crate) stream: StreamState,
    /// The sequence of the environment's last event in the stream (0: none).
    pub(crate) last_of_env: u64,
    /// The stream's `max_age` (zero: unlimited).
    pub(crate) max_age: Duration,
}

/// An observation the event loop had not caught up with when it was made.
#[derive(Debug, Clone, Copy)]
struct Behind {
    last_of_env: u64,
    last_sequence: u64,
    at: Instant,
}

/// Decides, from looks at the stream and the last event handled, whether the agent keeps up
/// and whether it may have missed events.
#[derive(Debug)]
pub(crate) struct Tracker {
    created_ns: i128,
    /// Every event of the environment up to this stream sequence was handled (or flushed over).
    scanned: u64,
    /// Every event published before this instant was handled (or flushed over).
    caught_up_at: Instant,
    /// The oldest observation not caught up with yet.
    behind: Option<Behind>,
    /// When a look at the stream last succeeded.
    last_look: Instant,
    /// How often the stream is looked at: a retention gap is assumed this much before the
    /// stream's `max_age` passes.
    interval: Duration,
    /// Bumped by every reset: a look begun before one is stale.
    generation: u64,
}

impl Tracker {
    /// A tracker for an agent up to date with stream sequence `position` of the stream created
    /// at `created_ns`, as of `now`.
    pub(crate) fn new(position: u64, created_ns: i128, now: Instant, interval: Duration) -> Self {
        Self {
            created_ns,
            scanned: position,
            caught_up_at: now,
            behind: None,
            last_look: now,
            interval,
            generation: 0,
        }
    }

    /// The cache was flushed at `now` and the agent carries on after `position`.
    pub(crate) fn reset(&mut self, position: u64, created_ns: i128, now: Instant) {
        let generation = self.generation + 1;
        *self = Self::new(position, created_ns, now, self.interval);
        self.generation = generation;
    }

    /// How many resets happened: a look taken before the last one says nothing about now.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Takes one look at the stream made at `at` (the time before it was read), with `handled`
    /// the last event the loop handled once the look was complete. Returns the gap it shows.
    pub(crate) fn observe(&mut self, look: Observation, handled: u64, at: Instant) -> Option<Gap> {
        self.last_look = at;
        if let Some(behind) = self.behind
            && handled >= behind.last_of_env
        {
            // Every event that existed when that look was made is handled now.
            self.scanned = self.scanned.max(behind.last_sequence);
            self.caught_up_at = self.caught_up_at.max(behind.at);
            self.behind = None;
        }
        // The scan position counts like a stored one: another stream, a sequence gone back,
        // or events after it dropped before they were known to be handled.
        if let Some(gap) = missed_events(self.scanned, self.created_ns, look.stream) {
            return Some(gap);
        }
        // Events published after the last time the agent was known caught up may have aged out.
        if let Some(expire_after) = self.expiry_bound(look.max_age)
            && at.saturating_duration_since(self.caught_up_at) >= expire_after
        {
            return Some(Gap::Retention);
        }
        if handled >= look.last_of_env {
            self.scanned = self.scanned.max(look.stream.last_sequence);
            self.caught_up_at = at;
        } else if self.behind.is_none() {
            self.behind = Some(Behind {
                last_of_env: look.last_of_env,
                last_sequence: look.stream.last_sequence,
                at,
            });
        }
        None
    }

    /// How long the agent may stay behind before events it has not received may expire: the
    /// stream's `max_age` less two looks (`None` when events do not age out, or age out too
    /// fast for looks to tell: then only the stream's first sequence shows a gap).
    fn expiry_bound(&self, max_age: Duration) -> Option<Duration> {
        let ages_out = !max_age.is_zero() && !self.blind_to_expiry(max_age);
        ages_out.then(|| max_age.saturating_sub(self.interval * 2))
    }

    /// Whether events age out too fast for the looks to follow: zero `max_age` is no expiry.
    pub(crate) fn blind_to_expiry(&self, max_age: Duration) -> bool {
        !max_age.is_zero() && max_age < self.interval * 4
    }

    /// Whether the last look found an event of the environment the loop had not handled.
    pub(crate) fn is_behind(&self) -> bool {
        self.behind.is_some()
    }

    /// How long the loop has not handled an event a look found, if it has not.
    pub(crate) fn behind_for(&self, now: Instant) -> Option<Duration> {
        self.behind.map(|b| now.saturating_duration_since(b.at))
    }

    /// The scan position, if it counts in the stream created at `created_ns`.
    pub(crate) fn scanned_in(&self, created_ns: i128) -> Option<u64> {
        (self.created_ns == created_ns).then_some(self.scanned)
    }

    /// How long the agent has been behind an event it knew of (zero while it keeps up), or
    /// since it last managed to look at the stream, whichever is longer.
    pub(crate) fn lag(&self, now: Instant) -> Duration {
        let behind = self
            .behind
            .map_or(Duration::ZERO, |b| now.saturating_duration_since(b.at));
        behind.max(now.saturating_duration_since(self.last_look))
    }
}

/// Why the agent cannot vouch for its cache now: either is enough to stop serving it.
#[derive(Debug, Default)]
pub(crate) struct Suspension {
    stale: AtomicBool,
    lagging: AtomicBool,
}

/// Which check suspends the cache.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Suspender {
    StalePresence,
    Lagging,
}

/// Evicts a whole cache, for the event loop and the watch tasks alike.
#[derive(Debug)]
pub(crate) struct Flusher<B> {
    pub(crate) backend: Arc<B>,
    pub(crate) env: EnvId,
    pub(crate) cache: Option<cachecast_proto::CacheId>,
    pub(crate) evict_timeout: Duration,
    pub(crate) suspension: Arc<Suspension>,
}

impl<B> Clone for Flusher<B> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            env: self.env.clone(),
            cache: self.cache.clone(),
            evict_timeout: self.evict_timeout,
            suspension: self.suspension.clone(),
        }
    }
}

impl<B: CacheBackend> Flusher<B> {
    /// Stops (`suspended`) or lets the cache serve again on behalf of `by`; it serves while
    /// no check suspends it.
    pub(crate) fn suspend(&self, by: Suspender, suspended: bool) {
        let flag = match by {
            Suspender::StalePresence => &self.suspension.stale,
            Suspender::Lagging => &self.suspension.lagging,
        };
        flag.store(suspended, Ordering::SeqCst);
        let any = self.suspension.stale.load(Ordering::SeqCst)
            || self.suspension.lagging.load(Ordering::SeqCst);
        self.backend.set_serving(!any);
    }

    /// Evicts everything, bounded by `evict_timeout`, and counts it under `reason`.
    pub(crate) async fn flush(&self, reason: &'static str) -> Result<u64, String> {
        let evicted = tokio::time::timeout(self.evict_timeout, self.backend.flush(&self.env))
            .await
            .map_err(|_| format!("timed out after {:?}", self.evict_timeout))?
            .map_err(|err| err.to_string())?;
        if let Some(cache) = &self.cache
            && let Err(err) = self.backend.mark_continuous(cache).await
        {
            // Harmless: the next check finds no mark and flushes once more.
            tracing::warn!(error = %err, "could not mark the flushed cache");
        }
        metrics::counter!("cachecast_agent_flushes_total", "env" => self.env.to_string(), "reason" => reason)
            .increment(1);
        tracing::info!(evicted, reason, "cache flushed");
        Ok(evicted)
    }
}

/// Everything the progress check needs.
pub(crate) struct ProgressCheck<B> {
    pub(crate) stream: stream::Stream,
    pub(crate) subject: String,
    pub(crate) tracker: Arc<std::sync::Mutex<Tracker>>,
    pub(crate) progress: Arc<Progress>,
    pub(crate) flusher: Flusher<B>,
    pub(crate) signals: mpsc::Sender<Signal>,
    /// How often it looks (once a heartbeat).
    pub(crate) interval: Duration,
    /// How often a lagging agent flushes again.
    pub(crate) heartbeat: Duration,
    /// Behind for longer than this, the agent stops vouching.
    pub(crate) max_lag: Duration,
}

impl<B: CacheBackend> ProgressCheck<B> {
    /// Looks at the stream every `interval` until the task is aborted.
    pub(crate) async fn run(self) {
        let env = self.flusher.env.to_string();
        let lag_seconds = metrics::gauge!("cachecast_agent_lag_seconds", "env" => env.clone());
        let lag_events = metrics::gauge!("cachecast_agent_lag_events", "env" => env);
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_flush = Instant::now();
        let mut next_resume = Instant::now();
        let mut warned_max_age = false;
        // The last full look, and the tracker's generation when it was taken.
        let mut last_full: Option<(Observation, u64)> = None;
        let mut looks = 0u64;
        // The environment's last event went back (the stream recreated, say): look in full.
        let mut last_of_env = 0u64;
        let mut went_back = false;
        loop {
            ticker.tick().await;
            let at = Instant::now();
            // The stream's info goes through the server's JetStream API queue, the direct get
            // does not: read the info every few looks, and at every look while behind.
            let generation = self.lock().generation();
            let full =
                went_back || looks.is_multiple_of(FULL_LOOK_EVERY) || self.lock().is_behind();
            looks += 1;
            let looked = match last_full {
                Some((previous, taken)) if !full && taken == generation => {
                    self.look_light(previous).await
                }
                _ => self
                    .look()
                    .await
                    .inspect(|look| last_full = Some((*look, generation))),
            };
            // The loop started over after a gap while this look was made: it is stale.
            if self.lock().generation() != generation {
                continue;
            }
            if let Ok(look) = &looked {
                went_back = look.last_of_env < last_of_env;
                last_of_env = look.last_of_env;
            }
            match looked {
                Ok(look) => {
                    if !warned_max_age && self.lock().blind_to_expiry(look.max_age) {
                        warned_max_age = true;
                        tracing::warn!(max_age = ?look.max_age, check_every = ?self.interval, "the stream's max_age is shorter than four progress checks: the agent cannot tell an expired event from one it handled, and flushes its cache whenever the stream dropped events it had not seen (raise stream.max_age)");
                    }
                    let handled = self.progress.handled();
                    let gap = self.lock().observe(look, handled, at);
                    if let Some(gap) = gap {
                        tracing::warn!(
                            reason = gap.reason(),
                            handled,
                            stream_first = look.stream.first_sequence,
                            stream_last = look.stream.last_sequence,
                            "the stream no longer holds events this agent may not have received; flushing and carrying on from its end"
                        );
                        self.signals.try_send(Signal::Gap(gap)).ok();
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "could not read the stream's progress; if this lasts the agent stops vouching for its cache");
                }
            }
            let now = Instant::now();
            // Live copies come at once: an event still unhandled a look later was lost, or
            // waits behind a slow eviction (the loop then ignores this).
            if self
                .lock()
                .behind_for(now)
                .is_some_and(|behind| behind >= self.interval)
            {
                self.signals.try_send(Signal::Behind).ok();
            }
            let lag = self.lock().lag(now);
            lag_seconds.set(lag.as_secs_f64());
            let behind = self.lock().is_behind();
            lag_events.set(self.progress.pending_or_behind(behind) as f64);
            if lag > self.max_lag {
                let reason = format!(
                    "no progress on this environment's events for {} s (agent.max_lag {} s): its event consumer is stalled or the stream unreadable",
                    lag.as_secs(),
                    self.max_lag.as_secs_f64()
                );
                if self.progress.set_lagging(Some(reason.clone())) {
                    tracing::error!(%reason, "the agent stops vouching for its cache: announcing `lagging`, flushing the cache every heartbeat until it catches up");
                    self.flusher.suspend(Suspender::Lagging, true);
                }
                // Its own consumer may be what is stuck: have it recreated, once per max_lag.
                if Instant::now() >= next_resume {
                    self.signals.try_send(Signal::Stalled).ok();
                    next_resume = Instant::now() + self.max_lag;
                }
                if Instant::now() >= next_flush {
                    if let Err(err) = self.flusher.flush("stalled").await {
                        tracing::warn!(%err, "could not flush the cache while lagging");
                    }
                    next_flush = Instant::now() + self.heartbeat;
                }
            } else if self.progress.set_lagging(None) {
                tracing::info!("the agent keeps up again: vouching for its cache");
                self.flusher.suspend(Suspender::Lagging, false);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stream's state, then its last event of the environment.
    async fn look(&self) -> Result<Observation, String> {
        let info = self
            .stream
            .clone()
            .info()
            .await
            .map_err(|e| format!("stream info: {e}"))?
            .clone();
        Ok(Observation {
            stream: StreamState::of(&info),
            last_of_env: self.last_of_env().await?,
            max_age: info.config.max_age,
        })
    }

    /// The environment's last event, with the stream's state of an earlier look. Sound for
    /// the tracker: an older state only delays what it shows, and an event of the environment
    /// that expired since that state was read makes the agent miss `max_age` first.
    async fn look_light(&self, earlier: Observation) -> Result<Observation, String> {
        Ok(Observation {
            last_of_env: self.last_of_env().await?,
            ..earlier
        })
    }

    /// The sequence of the environment's last event in the stream (0: none).
    async fn last_of_env(&self) -> Result<u64, String> {
        match self
            .stream
            .direct_get_last_for_subject(self.subject.as_str())
            .await
        {
            Ok(message) => Ok(message.sequence),
            Err(err)
                if err.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound =>
            {
                Ok(0)
            }
            Err(err) => Err(format!(
                "last event of the environment: {err} (the stream must allow direct gets: a publisher turns them on when it may update the stream; else run `nats stream edit {} --allow-direct`)",
                self.stream.cached_info().config.name
            )),
        }
    }
}

/// Every how many looks the progress check reads the stream's info too.
const FULL_LOOK_EVERY: u64 = 5;

/// How often the stale-presence check runs, at most: an eighth of a heartbeat when that is
/// shorter. Publishers stop expecting the agent three heartbeats after its last write and it
/// flushes after two, so the check's period comes straight off that one-heartbeat margin: with
/// a fixed 250 ms period and a 250 ms heartbeat the flush could come after publishers had
/// already answered without it (the fault schedule found it).
const FRESHNESS_CHECK: Duration = Duration::from_millis(250);

/// While presence writes fail, publishers stop expecting this agent three heartbeats after its
/// last one, and answer without it, but the agent cannot hear their events: so after two
/// heartbeats without a successful write it suspends the cache (it caches and serves nothing)
/// and flushes it, and again every heartbeat while the outage lasts. Once presence is fresh it
/// serves again a heartbeat after a flush that succeeded since the outage began: a cache whose
/// flush fails stays suspended, flushed every heartbeat, until one succeeds (soak seed 453: a
/// failing cache served again what a `200` answered without it had invalidated). For a cache
/// in the agent's process only: a persistent cache stays registered, so publishers keep
/// expecting it (and answer `424 unattended`) however long its agent is cut off.
pub(crate) async fn flush_while_presence_stale<B: CacheBackend>(
    flusher: Flusher<B>,
    last_write: Arc<std::sync::Mutex<Instant>>,
    heartbeat: Duration,
) {
    let period = (heartbeat / 8).clamp(Duration::from_millis(5), FRESHNESS_CHECK);
    let mut ticker = tokio::time::interval(period);
    // Set while suspended for an outage: when to flush next.
    let mut next_flush: Option<Instant> = None;
    // Whether a flush succeeded since the outage began.
    let mut clean = false;
    // Back from an outage, the cache serves a heartbeat after presence is fresh: by then
    // publishers have seen it and wait for this agent's acks again. Serving as soon as a write
    // succeeded let a fill in between outlive a `200` answered without it (the fault schedule
    // found it, seed 105).
    let mut serve_at = None;
    loop {
        ticker.tick().await;
        let since = last_write
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed();
        if since < heartbeat * 2 {
            if let Some(at) = next_flush {
                if !clean {
                    if Instant::now() >= at {
                        clean = flush_counted(&flusher).await;
                        next_flush = Some(Instant::now() + heartbeat);
                    }
                    if !clean {
                        continue;
                    }
                }
                next_flush = None;
                tracing::info!(
                    "presence is refreshed again: the cache serves again in a heartbeat, once publishers expect this agent"
                );
                serve_at = Some(Instant::now() + heartbeat);
            }
            if serve_at.is_some_and(|at| Instant::now() >= at) {
                serve_at = None;
                flusher.suspend(Suspender::StalePresence, false);
            }
            continue;
        }
        serve_at = None;
        if next_flush.is_some_and(|at| Instant::now() < at) {
            continue;
        }
        if next_flush.is_none() {
            tracing::warn!(
                ?since,
                "presence is not being refreshed: publishers will stop expecting this agent; the cache caches and serves nothing until it is back"
            );
            flusher.suspend(Suspender::StalePresence, true);
            clean = false;
        }
        clean = flush_counted(&flusher).await || clean;
        next_flush = Some(Instant::now() + heartbeat);
    }
}

/// One flush of a cut-off cache; whether it succeeded.
async fn flush_counted<B: CacheBackend>(flusher: &Flusher<B>) -> bool {
    match flusher.flush("disconnected").await {
        Ok(_) => true,
        Err(err) => {
            tracing::warn!(%err, "could not flush while disconnected; the cache stays suspended until a flush succeeds");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREATED: i128 = 1_700_000_000_000_000_000;
    const LOOK: Duration = Duration::from_secs(2);
    const DAY: Duration = Duration::from_secs(86_400);

    fn look(first: u64, last: u64, last_of_env: u64) -> Observation {
        Observation {
            stream: StreamState {
                first_sequence: first,
                last_sequence: last,
                created_ns: CREATED,
                last_stored_ns: 0,
            },
            last_of_env,
            max_age: DAY,
        }
    }

    #[test]
    fn an_agent_that_keeps_up_shows_no_lag_and_no_gap() {
        let start = Instant::now();
        let mut tracker = Tracker::new(10, CREATED, start, LOOK);
        for i in 1..100u64 {
            let at = start + LOOK * i as u32;
            assert_eq!(tracker.observe(look(1, 10 + i, 10 + i), 10 + i, at), None);
            assert_eq!(tracker.lag(at), Duration::ZERO);
        }
    }

    #[test]
    fn behind_a_known_event_grows_the_lag_until_it_is_handled() {
        let start = Instant::now();
        let mut tracker = Tracker::new(10, CREATED, start, LOOK);
        assert_eq!(tracker.observe(look(1, 12, 12), 10, start), None);
        assert_eq!(tracker.observe(look(1, 12, 12), 10, start + LOOK), None);
        assert_eq!(tracker.lag(start + LOOK * 3), LOOK * 3, "stalled");
        // Under steady load a new event is always pending, but each look's target is reached.
        assert_eq!(tracker.observe(look(1, 20, 20), 12, start + LOOK * 4), None);
        assert_eq!(tracker.lag(start + LOOK * 4), Duration::ZERO);
    }

    #[test]
    fn failed_looks_count_as_lag() {
        let start = Instant::now();
        let tracker = Tracker::new(10, CREATED, start, LOOK);
        assert_eq!(tracker.lag(start + LOOK * 5), LOOK * 5);
    }

    #[test]
    fn other_environments_dropped_by_retention_are_no_gap() {
        // Idle here, busy elsewhere: the stream's first sequence keeps passing this agent's
        // last event, but every look moves the scan position to the stream's end.
        let start = Instant::now();
        let mut tracker = Tracker::new(10, CREATED, start, LOOK);
        for i in 1..50u64 {
            let at = start + LOOK * i as u32;
            // Each look, the stream holds only what arrived since the one before.
            let (first, last) = (100 * (i - 1) + 1, 100 * i);
            assert_eq!(
                tracker.observe(look(first, last, 10), 10, at),
                None,
                "look {i}"
            );
        }
    }

    #[test]
    fn events_dropped_before_they_were_handled_are_a_gap() {
        let start = Instant::now();
        let mut tracker = Tracker::new(10, CREATED, start, LOOK);
        // The agent is paused: events 11..=700 arrive; then 11..=300 are dropped.
        assert_eq!(tracker.observe(look(1, 700, 700), 10, start), None);
        assert_eq!(
            tracker.observe(look(301, 700, 700), 200, start + LOOK),
            Some(Gap::Retention)
        );
    }

    #[test]
    fn a_skip_over_dropped_events_is_a_gap_even_after_the_fact() {
        // The consumer skipped from 10 to 500 between two looks: handled is past the dropped
        // events, but the scan position is not.
        let start = Instant::now();
        let mut tracker = Tracker::new(10, CREATED, start, LOOK);
        assert_eq!(
            tracker.observe(look(400, 500, 500), 500, start + LOOK),
            Some(Gap::Retention)
        );
    }

    #[test]
    fn lagging_close_to_max_age_is_a_gap() {
        let start = Instant::now();
        let max_age = Duration::from_secs(60);
        let mut tracker = Tracker::new(10, CREATED, start, LOOK);
        let aged = |first, last, env| Observation {
            max_age,
            ..look(first, last, env)
        };
        assert_eq!(tracker.observe(aged(1, 20, 20), 10, start), None);
        assert_eq!(
            tracker.observe(aged(1, 30, 30), 15, start + Duration::from_secs(50)),
            None
        );
        assert_eq!(
            tracker.observe(aged(1, 40, 40), 18, start + Duration::from_secs(57)),
            Some(Gap::Retention),
            "never caught up for max_age less two looks"
        );
    }

    #[test]
    fn events_that_age_out_faster_than_looks_leave_only_the_first_sequence_rule() {
        let start = Instant::now();
        let mut tracker = Tracker::new(10, CREATED, start, LOOK);
        let fast = |first, last, env| Observation {
            max_age: Duration::from_secs(1),
            ..look(first, last, env)
        };
        assert!(tracker.blind_to_expiry(Duration::from_secs(1)));
        assert!(!tracker.blind_to_expiry(Duration::ZERO), "no max age");
        // Idle: the stream emptied itself since the last look, nothing was missed.
        for i in 1..10u32 {
            assert_eq!(tracker.observe(fast(11, 10, 0), 10, start + LOOK * i), None);
        }
        assert_eq!(
            tracker.observe(fast(15, 20, 20), 10, start + LOOK * 10),
            Some(Gap::Retention)
        );
    }

    #[test]
    fn a_new_stream_or_a_sequence_that_went_back_is_a_recreated_stream() {
        let start = Instant::now();
        let mut tracker = Tracker::new(10, CREATED, start, LOOK);
        let mut recreated = look(1, 3, 3);
        recreated.stream.created_ns = CREATED + 1;
        assert_eq!(
            tracker.observe(recreated, 10, start + LOOK),
            Some(Gap::StreamRecreated)
        );
        let mut tracker = Tracker::new(10, CREATED, start, LOOK);
        assert_eq!(
            tracker.observe(look(1, 5, 5), 10, start + LOOK),
            Some(Gap::StreamRecreated)
        );
    }

    #[test]
    fn a_reset_starts_over_from_the_flush() {
        let start = Instant::now();
        let mut tracker = Tracker::new(10, CREATED, start, LOOK);
        assert!(tracker.observe(look(301, 700, 700), 10, start).is_some());
        tracker.reset(700, CREATED, start + LOOK);
        assert_eq!(tracker.generation(), 1, "looks begun before are stale");
        assert_eq!(
            tracker.observe(look(301, 700, 700), 700, start + LOOK),
            None
        );
        assert_eq!(tracker.lag(start + LOOK), Duration::ZERO);
    }
}
