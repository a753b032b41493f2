//! A partition's queue of fetched records, taken a batch at a time.
//!
//! rust-rdkafka hands a partition queue's records over one at a time, and each costs two clock
//! reads (its own timeout, and librdkafka's `max.poll.interval.ms` bookkeeping), an event
//! object, an `Arc` and a wake-up registration: at Kafka rates that was a fifth of a worker's
//! CPU, more than decoding the JSON (docs/benchmarks.md). Here the queue is librdkafka's own
//! (`rd_kafka_queue_get_partition`, no longer forwarded to the consumer's queue), read with
//! `rd_kafka_consume_batch_queue`, which pays the clock and the poll bookkeeping once per
//! batch; a record is a borrowed view of the `rd_kafka_message_t`, destroyed with its batch.
//! When the queue becomes non-empty, librdkafka calls back and the reading worker is woken.

use std::ffi::{c_void, CStr, CString};
use std::ptr::NonNull;
use std::sync::Arc;

use rdkafka::bindings as rd;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::Notify;

/// Called by librdkafka (a broker thread, under the queue's lock) whenever a record or an error
/// is put on the queue: wakes the worker that reads it. Must not call librdkafka.
unsafe extern "C" fn on_arrival(_rk: *mut rd::rd_kafka_t, opaque: *mut c_void) {
    // SAFETY: `opaque` is the `Notify` the queue holds an `Arc` of; the callback is turned off
    // (under the same lock) before that `Arc` is dropped.
    let wake = unsafe { &*(opaque as *const Notify) };
    wake.notify_one();
}

/// One partition's records, split off the consumer's queue so that one worker reads them.
pub(super) struct PartitionQueue {
    queue: NonNull<rd::rd_kafka_queue_t>,
    /// What the arrival callback wakes; it points here, so this lives as long as the queue.
    _wake: Arc<Notify>,
    /// The client the queue belongs to, kept alive as long as the queue.
    _client: Arc<dyn Send + Sync>,
}

// SAFETY: librdkafka's queues are locked internally and may be used and destroyed from any
// thread; the handle is owned by this struct alone.
unsafe impl Send for PartitionQueue {}
// SAFETY: as above; `take` only needs the queue's own lock.
unsafe impl Sync for PartitionQueue {}

impl std::fmt::Debug for PartitionQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionQueue").finish_non_exhaustive()
    }
}

impl PartitionQueue {
    /// Gives `partition` of `topic` a queue of its own (records stop going to the consumer's
    /// queue), whose arrivals wake `wake`. `None` when the name cannot be a topic's or the
    /// client refuses.
    pub(super) fn split<C: ConsumerContext + 'static>(
        consumer: &Arc<StreamConsumer<C>>,
        topic: &str,
        partition: i32,
        wake: Arc<Notify>,
    ) -> Option<Self> {
        let name = CString::new(topic).ok()?;
        // SAFETY: the client pointer is valid while `consumer` lives; the returned handle is
        // ours to destroy.
        let raw = unsafe { rd::rd_kafka_queue_get_partition(consumer.client().native_ptr(), name.as_ptr(), partition) };
        let queue = NonNull::new(raw)?;
        // SAFETY: `queue` is a valid handle. Forwarding to nothing keeps the partition's records
        // on its own queue; the callback's opaque outlives it (see `Drop`).
        unsafe {
            rd::rd_kafka_queue_forward(queue.as_ptr(), std::ptr::null_mut());
            rd::rd_kafka_queue_cb_event_enable(queue.as_ptr(), Some(on_arrival), Arc::as_ptr(&wake) as *mut c_void);
        }
        Some(Self { queue, _wake: wake, _client: consumer.clone() })
    }

    /// Moves up to `max` records already on the queue into `into`, without waiting; returns
    /// how many came.
    pub(super) fn take(&self, max: usize, into: &mut Fetched) -> usize {
        into.clear();
        into.messages.resize(max, std::ptr::null_mut());
        // SAFETY: `messages` has room for `max` pointers; librdkafka fills the first `n` with
        // messages we own until destroyed.
        let n = unsafe { rd::rd_kafka_consume_batch_queue(self.queue.as_ptr(), 0, into.messages.as_mut_ptr(), max) };
        into.messages.truncate(usize::try_from(n).unwrap_or(0));
        into.messages.len()
    }
}

impl Drop for PartitionQueue {
    fn drop(&mut self) {
        // SAFETY: turning the callback off takes the queue's lock, which every call of it
        // holds: once this returns, none runs or will run, and `wake` may go.
        unsafe {
            rd::rd_kafka_queue_cb_event_enable(self.queue.as_ptr(), None, std::ptr::null_mut());
            rd::rd_kafka_queue_destroy(self.queue.as_ptr());
        }
    }
}

/// Records taken from a queue, owned until cleared (each is a librdkafka message to destroy).
/// Reused from batch to batch, so taking records allocates nothing.
#[derive(Default)]
pub(super) struct Fetched {
    messages: Vec<*mut rd::rd_kafka_message_t>,
}

// SAFETY: the messages are owned by this struct alone and librdkafka lets any thread destroy
// them.
unsafe impl Send for Fetched {}

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetched").field("records", &self.messages.len()).finish()
    }
}

impl Fetched {
    /// The records, in the order the partition has them.
    pub(super) fn records(&self) -> impl Iterator<Item = Record<'_>> {
        // SAFETY: every pointer is a live message until `clear`, which needs `&mut self`.
        self.messages.iter().map(|m| Record { m: unsafe { &**m } })
    }

    /// Destroys the records.
    pub(super) fn clear(&mut self) {
        for m in self.messages.drain(..) {
            // SAFETY: each message is destroyed once, here, and no `Record` borrows it.
            unsafe { rd::rd_kafka_message_destroy(m) };
        }
    }
}

impl Drop for Fetched {
    fn drop(&mut self) {
        self.clear();
    }
}

/// A record of a partition queue (or an error the client put there).
#[derive(Clone, Copy)]
pub(super) struct Record<'a> {
    m: &'a rd::rd_kafka_message_t,
}

impl std::fmt::Debug for Record<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record").field("offset", &self.m.offset).finish_non_exhaustive()
    }
}

/// `len` bytes at `ptr`, or nothing.
///
/// # Safety
/// `ptr` is null or points to `len` bytes that live as long as `'a`.
unsafe fn bytes<'a>(ptr: *mut c_void, len: usize) -> Option<&'a [u8]> {
    if ptr.is_null() {
        None
    } else {
        // SAFETY: the caller's promise.
        Some(unsafe { std::slice::from_raw_parts(ptr as *const u8, len) })
    }
}

impl<'a> Record<'a> {
    /// The client's error in place of a record (a fetch that failed), if that is what it is.
    pub(super) fn error(&self) -> Option<KafkaError> {
        (self.m.err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR)
            .then(|| KafkaError::MessageConsumption(RDKafkaErrorCode::from(self.m.err)))
    }

    pub(super) fn offset(&self) -> i64 {
        self.m.offset
    }

    pub(super) fn payload(&self) -> Option<&'a [u8]> {
        // SAFETY: librdkafka's message holds `len` bytes at `payload` while it lives.
        unsafe { bytes(self.m.payload, self.m.len) }
    }

    pub(super) fn key(&self) -> Option<&'a [u8]> {
        // SAFETY: as for the payload.
        unsafe { bytes(self.m.key, self.m.key_len) }
    }

    /// The broker's timestamp (create or log-append time) in ms, when it has one.
    pub(super) fn timestamp(&self) -> Option<i64> {
        let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: a live message.
        let t = unsafe { rd::rd_kafka_message_timestamp(self.m, &mut kind) };
        (t != -1 && kind != rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE).then_some(t)
    }

    /// The record's headers, in order (a value may be null).
    pub(super) fn headers(&self) -> Vec<(std::borrow::Cow<'a, str>, Option<&'a [u8]>)> {
        let mut hdrs: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
        // SAFETY: a live message; librdkafka parses its headers once and keeps them with it.
        let err = unsafe { rd::rd_kafka_message_headers(self.m, &mut hdrs) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || hdrs.is_null() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for idx in 0.. {
            let mut name: *const std::ffi::c_char = std::ptr::null();
            let mut value: *const c_void = std::ptr::null();
            let mut size = 0usize;
            // SAFETY: `hdrs` lives with the message; the out-pointers are valid.
            let err = unsafe { rd::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size) };
            if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                break;
            }
            // SAFETY: a header's name is a NUL-terminated string and its value `size` bytes,
            // both held by the message.
            let key = unsafe { CStr::from_ptr(name) }.to_string_lossy();
            out.push((key, unsafe { bytes(value as *mut c_void, size) }));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::FutureExt as _;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer as _};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};

    use super::*;

    /// Waits (at most 10 s) for `wake`, then takes what `q` has.
    async fn next_batch(q: &PartitionQueue, wake: &Notify, into: &mut Fetched) -> usize {
        loop {
            let n = q.take(1024, into);
            if n > 0 {
                return n;
            }
            tokio::time::timeout(Duration::from_secs(10), wake.notified()).await.expect("no record woke the reader");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partition_s_records_come_in_batches_with_their_keys_times_and_headers() {
        let mock = MockCluster::<DefaultProducerContext>::new(1).unwrap();
        mock.create_topic("t", 2, 1).unwrap();
        let brokers = mock.bootstrap_servers();
        let producer: BaseProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
        let produce = |n: std::ops::Range<i64>| {
            for i in n {
                let (payload, key) = (format!("v{i}"), format!("k{i}"));
                let mut rec = BaseRecord::<String, String>::to("t").partition(0).key(&key).timestamp(1_000 + i);
                if i % 100 != 7 {
                    rec = rec.payload(&payload);
                }
                if i % 2 == 0 {
                    rec = rec.headers(
                        OwnedHeaders::new()
                            .insert(Header { key: "h", value: Some(payload.as_bytes()) })
                            .insert(Header { key: "none", value: None::<&[u8]> }),
                    );
                }
                producer.send(rec).unwrap();
            }
            producer.send(BaseRecord::<str, str>::to("t").partition(1).payload("other")).unwrap();
            producer.flush(Duration::from_secs(10)).unwrap();
        };
        produce(0..2_500);

        let consumer: Arc<StreamConsumer> =
            Arc::new(ClientConfig::new().set("bootstrap.servers", &brokers).set("group.id", "g").create().unwrap());
        let (wake0, wake1) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let q0 = PartitionQueue::split(&consumer, "t", 0, wake0.clone()).unwrap();
        let q1 = PartitionQueue::split(&consumer, "t", 1, wake1.clone()).unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t", 0, Offset::Beginning).unwrap();
        tpl.add_partition_offset("t", 1, Offset::Beginning).unwrap();
        consumer.assign(&tpl).unwrap();

        let mut fetched = Fetched::default();
        let mut next = 0i64;
        while next < 2_500 {
            let n = next_batch(&q0, &wake0, &mut fetched).await;
            assert!(n <= 1024, "took {n} records when asked for at most 1024");
            for r in fetched.records() {
                assert!(r.error().is_none(), "{:?}", r.error());
                let i = r.offset();
                assert_eq!(i, next, "records in the partition's order, none left out");
                let payload = format!("v{i}");
                let expected_payload = (i % 100 != 7).then_some(payload.as_bytes());
                assert_eq!(r.payload(), expected_payload, "offset {i}");
                assert_eq!(r.key(), Some(format!("k{i}").as_bytes()));
                assert_eq!(r.timestamp(), Some(1_000 + i));
                let headers = r.headers();
                if i % 2 == 0 {
                    assert_eq!(headers.len(), 2, "offset {i}");
                    assert_eq!((headers[0].0.as_ref(), headers[0].1), ("h", Some(payload.as_bytes())));
                    assert_eq!((headers[1].0.as_ref(), headers[1].1), ("none", None));
                } else {
                    assert!(headers.is_empty(), "offset {i}: {headers:?}");
                }
                next += 1;
            }
            fetched.clear();
        }
        // The other partition's record is on its own queue, and none reached the consumer's.
        next_batch(&q1, &wake1, &mut fetched).await;
        assert_eq!(fetched.records().map(|r| r.payload()).collect::<Vec<_>>(), vec![Some(&b"other"[..])]);
        fetched.clear();
        assert!(consumer.recv().now_or_never().is_none(), "a record reached the consumer's own queue");

        // Drained, the queue wakes its reader again when the next records come.
        assert_eq!(q0.take(1024, &mut fetched), 0);
        produce(2_500..2_510);
        let n = next_batch(&q0, &wake0, &mut fetched).await;
        assert_eq!(fetched.records().next().map(|r| r.offset()), Some(2_500));
        assert!(n <= 10);
    }
}
