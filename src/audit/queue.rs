//! The hand-off from requests to the audit writer: a bounded queue under a
//! mutex, with a condition variable the writer sleeps on.
//!
//! A request does not wake the writer for every record, which would cost
//! a futex call and two context switches per record. It wakes it only when
//! the writer sleeps with nothing to do, or when the request waits for its
//! record (a decision record, a flush) and the writer is lingering. A busy
//! writer finds new records when it is done with its batch; a lingering
//! one (holding records nobody waits for, so that they gather into one
//! write) takes them when its pause is over or the queue is half full.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use super::Pending;

pub(super) enum Msg {
    Record(Pending),
    /// Acknowledged once every record queued before it is written (or
    /// spilled, or counted as dropped).
    Flush(oneshot::Sender<()>),
}

impl Msg {
    /// Someone waits for this message to be handled.
    fn urgent(&self) -> bool {
        match self {
            Msg::Record(p) => p.ack.is_some(),
            Msg::Flush(_) => true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriterState {
    /// Writing a batch, or about to look at the queue again.
    Busy,
    /// Asleep with nothing queued.
    Idle,
    /// Asleep, letting records nobody waits for gather.
    Lingering,
}

struct State {
    msgs: Vec<Msg>,
    /// Bytes of the records queued.
    bytes: usize,
    writer: WriterState,
    /// A queued message is waited for.
    urgent: bool,
    /// Every handle is gone: no more messages come.
    closed: bool,
}

pub(super) enum PushError {
    Full(Msg),
    Closed(Msg),
}

/// What the writer's wait ended with.
pub(super) enum Take {
    /// A batch was moved into the caller's vector.
    Batch,
    /// The tick interval passed with nothing queued.
    Tick,
    /// Closed and empty.
    Closed,
}

pub(super) struct Queue {
    state: Mutex<State>,
    /// The writer sleeps here.
    work: Condvar,
    /// Requests waiting for room sleep here (asynchronously).
    room: Notify,
    capacity: usize,
    /// Bytes of records it holds before a request must wait ([`max_bytes`]).
    max_bytes: usize,
    /// Messages queued (for the queue-depth gauge, read without the lock).
    len: AtomicUsize,
}

/// Bytes of records a queue of `capacity` records (or the writer's hold of
/// as many) keeps: room for typical records (under 2 KiB) at its capacity,
/// 64 MiB at least. Records of large Bundles cannot fill memory by count.
pub(super) fn max_bytes(capacity: usize) -> usize {
    capacity.saturating_mul(2048).max(64 << 20)
}

impl Queue {
    pub(super) fn new(capacity: usize) -> Queue {
        Queue::bounded(capacity, max_bytes(capacity))
    }

    /// A queue of `capacity` records and `max_bytes` bytes of them.
    fn bounded(capacity: usize, max_bytes: usize) -> Queue {
        Queue {
            state: Mutex::new(State {
                msgs: Vec::with_capacity(capacity.min(4096)),
                bytes: 0,
                writer: WriterState::Busy,
                urgent: false,
                closed: false,
            }),
            work: Condvar::new(),
            room: Notify::new(),
            capacity: capacity.max(1),
            max_bytes,
            len: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing done under the lock can be left half-done by a panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records it holds before a request must wait (or spill).
    pub(super) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(super) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// The writer takes a batch at once rather than lingering.
    fn batch_ready(&self, st: &State) -> bool {
        st.urgent || st.closed || st.msgs.len() >= self.capacity.div_ceil(2)
    }

    /// Queues a message if there is room (a flush always finds room).
    pub(super) fn try_push(&self, msg: Msg) -> Result<(), PushError> {
        let mut st = self.lock();
        if st.closed {
            return Err(PushError::Closed(msg));
        }
        if let Msg::Record(p) = &msg {
            // A record larger than the bound alone goes into an empty
            // queue (it could never go otherwise).
            let over = !st.msgs.is_empty() && st.bytes + p.bytes.len() > self.max_bytes;
            if st.msgs.len() >= self.capacity || over {
                return Err(PushError::Full(msg));
            }
            st.bytes += p.bytes.len();
        }
        st.urgent |= msg.urgent();
        st.msgs.push(msg);
        self.len.store(st.msgs.len(), Ordering::Relaxed);
        let wake = match st.writer {
            WriterState::Idle => true,
            WriterState::Lingering => self.batch_ready(&st),
            WriterState::Busy => false,
        };
        if wake {
            // Woken once: later pushes need not call again.
            st.writer = WriterState::Busy;
            drop(st);
            self.work.notify_one();
        }
        Ok(())
    }

    /// Queues a message, waiting for room when the queue is full. Hands
    /// the message back if the queue is closed.
    pub(super) async fn push(&self, mut msg: Msg) -> Result<(), Msg> {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            // Registered before the attempt: room made in between is seen.
            room.as_mut().enable();
            match self.try_push(msg) {
                Ok(()) => return Ok(()),
                Err(PushError::Closed(m)) => return Err(m),
                Err(PushError::Full(m)) => {
                    msg = m;
                    room.await;
                }
            }
        }
    }

    /// No more messages will come; the writer drains what is queued.
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.work.notify_one();
    }

    /// The writer is gone: closes the queue and hands back what is in it.
    /// Requests waiting for room find it closed.
    pub(super) fn abandon(&self) -> Vec<Msg> {
        let left = {
            let mut st = self.lock();
            st.closed = true;
            self.len.store(0, Ordering::Relaxed);
            st.bytes = 0;
            std::mem::take(&mut st.msgs)
        };
        self.room.notify_waiters();
        left
    }

    /// The writer's wait for its next batch, moved into `out` (empty on
    /// entry). Records nobody waits for are left to gather for `linger`;
    /// with nothing queued, the wait ends after `tick` (if any).
    pub(super) fn take(
        &self,
        out: &mut Vec<Msg>,
        tick: Option<Duration>,
        linger: Duration,
    ) -> Take {
        debug_assert!(out.is_empty());
        let tick_at = tick.map(|t| Instant::now() + t);
        let mut linger_until: Option<Instant> = None;
        let mut st = self.lock();
        loop {
            let now = Instant::now();
            if !st.msgs.is_empty() {
                let until = *linger_until.get_or_insert(now + linger);
                if self.batch_ready(&st) || now >= until {
                    std::mem::swap(&mut st.msgs, out);
                    st.bytes = 0;
                    st.urgent = false;
                    st.writer = WriterState::Busy;
                    self.len.store(0, Ordering::Relaxed);
                    drop(st);
                    self.room.notify_waiters();
                    return Take::Batch;
                }
                st.writer = WriterState::Lingering;
                st = self
                    .work
                    .wait_timeout(st, until - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            if st.closed {
                return Take::Closed;
            }
            if tick_at.is_some_and(|t| now >= t) {
                st.writer = WriterState::Busy;
                return Take::Tick;
            }
            st.writer = WriterState::Idle;
            st = match tick_at {
                Some(t) => {
                    self.work
                        .wait_timeout(st, t - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.work.wait(st).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(waited: bool) -> (Msg, Option<oneshot::Receiver<bool>>) {
        let (tx, rx) = oneshot::channel();
        let p = Pending {
            id: "r".into(),
            bytes: b"{}".to_vec(),
            ack: None,
        };
        if waited {
            (Msg::Record(Pending { ack: Some(tx), ..p }), Some(rx))
        } else {
            (Msg::Record(p), None)
        }
    }

    /// Bytes bound a queue too: records of large Bundles wait (or spill)
    /// before memory fills; one larger than the bound goes alone.
    #[test]
    fn a_queue_holds_so_many_bytes() {
        let q = Queue::bounded(100, 3000);
        let big = |n: usize| {
            Msg::Record(Pending {
                id: "r".into(),
                bytes: vec![b'x'; n],
                ack: None,
            })
        };
        let third = 1000;
        for _ in 0..3 {
            assert!(q.try_push(big(third)).is_ok());
        }
        assert!(matches!(q.try_push(big(third)), Err(PushError::Full(_))));
        let mut out = Vec::new();
        assert!(matches!(
            q.take(&mut out, None, Duration::ZERO),
            Take::Batch
        ));
        assert!(
            q.try_push(big(4 * third)).is_ok(),
            "alone, a larger one goes"
        );
        assert!(matches!(q.try_push(big(10)), Err(PushError::Full(_))));
    }

    #[test]
    fn a_full_queue_refuses_records_but_not_a_flush() {
        let q = Queue::new(2);
        for _ in 0..2 {
            assert!(q.try_push(record(false).0).is_ok());
        }
        assert!(matches!(
            q.try_push(record(false).0),
            Err(PushError::Full(_))
        ));
        let (tx, _rx) = oneshot::channel();
        assert!(q.try_push(Msg::Flush(tx)).is_ok());
        assert_eq!(q.len(), 3);
    }

    #[test]
    fn records_nobody_waits_for_linger_and_a_waited_one_ends_the_wait() {
        let q = std::sync::Arc::new(Queue::new(100));
        q.try_push(record(false).0).ok().unwrap();
        // Alone, an unwaited record is taken once the linger is over.
        let t0 = Instant::now();
        let mut out = Vec::new();
        assert!(matches!(
            q.take(&mut out, None, Duration::from_millis(50)),
            Take::Batch
        ));
        assert!(t0.elapsed() >= Duration::from_millis(50));
        assert_eq!(out.len(), 1);
        out.clear();
        // A waited record pushed during a long linger ends it at once.
        q.try_push(record(false).0).ok().unwrap();
        let q2 = q.clone();
        let pusher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            q2.try_push(record(true).0).ok().unwrap();
        });
        let t0 = Instant::now();
        assert!(matches!(
            q.take(&mut out, None, Duration::from_secs(30)),
            Take::Batch
        ));
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert_eq!(out.len(), 2);
        pusher.join().unwrap();
    }

    #[test]
    fn an_idle_writer_ticks_and_a_closed_queue_ends_after_its_last_batch() {
        let q = Queue::new(10);
        let mut out = Vec::new();
        assert!(matches!(
            q.take(&mut out, Some(Duration::from_millis(10)), Duration::ZERO),
            Take::Tick
        ));
        q.try_push(record(false).0).ok().unwrap();
        q.close();
        assert!(matches!(
            q.take(&mut out, None, Duration::from_secs(30)),
            Take::Batch
        ));
        out.clear();
        assert!(matches!(
            q.take(&mut out, None, Duration::from_secs(30)),
            Take::Closed
        ));
        assert!(matches!(
            q.try_push(record(false).0),
            Err(PushError::Closed(_))
        ));
    }

    #[test]
    fn a_queue_abandoned_by_its_writer_fails_its_waiters() {
        let q = std::sync::Arc::new(Queue::new(1));
        let (waited, ack) = record(true);
        q.try_push(waited).ok().unwrap();
        let (flush_tx, flush_rx) = oneshot::channel();
        q.try_push(Msg::Flush(flush_tx)).ok().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let q2 = q.clone();
        // Waits for room in the full queue until the writer is gone.
        let blocked = rt.spawn(async move { q2.push(record(false).0).await.is_err() });
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
        let left = q.abandon();
        assert_eq!(left.len(), 2);
        drop(left);
        assert!(ack.unwrap().blocking_recv().is_err(), "the decision fails");
        assert!(flush_rx.blocking_recv().is_err(), "the flush returns");
        assert!(
            rt.block_on(blocked).unwrap(),
            "a request waiting for room is told the queue is closed"
        );
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn a_request_waiting_for_room_gets_in_when_the_writer_takes_a_batch() {
        let q = std::sync::Arc::new(Queue::new(1));
        q.try_push(record(false).0).ok().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let q2 = q.clone();
        let taker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            let mut out = Vec::new();
            q2.take(&mut out, None, Duration::ZERO);
            out.len()
        });
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), q.push(record(false).0))
                .await
                .expect("room was made")
                .ok()
                .unwrap();
        });
        assert_eq!(taker.join().unwrap(), 1);
        assert_eq!(q.len(), 1);
    }
}
