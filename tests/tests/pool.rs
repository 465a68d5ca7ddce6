//! The worker pool with real workers (of the test engine, see `tidepool_tests::test_engine`) on
//! the tiny fixture: workers load and serve, a
//! full pool queues and refuses, deadlines expire, draining never drops a running request, and
//! the ledger refuses a worker that does not fit.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tidepool_engine::choice::EngineKind;
use tidepool_engine::request::{ChatMessage, GenerationEvent, GenerationRequest, Role};
use tidepool_engine::{DevicePreference, EngineConfig};
use tidepool_models::model_source::local_file;
use tidepool_sched::ledger::Reservation;
use tidepool_sched::pool::{AcquireError, Pool, WorkerState};
use tidepool_sched::queue::Class;
use tidepool_tests::{test_engine, tiny_fixture, worker_factory};

const RESERVATION: Reservation = Reservation {
    weights: 400,
    kv_cache: 100,
    overhead: 0,
    shared_weights: None,
};

fn pool(budget: u64, queue: usize) -> Arc<Pool> {
    let factory = worker_factory(
        local_file(&tiny_fixture()).unwrap(),
        EngineConfig {
            device: DevicePreference::Cpu,
            max_sequences: 1,
            prefix_cache_entries: 0,
            pooling: None,
        },
        RESERVATION,
    );
    Pool::new(factory, budget, queue)
}

/// What the pool's workers say they reserve, in all.
fn reserved_by_workers(p: &Pool) -> u64 {
    p.workers().iter().map(|w| w.reserved_bytes).sum()
}

async fn wait_ready(p: &Pool, id: u64) {
    tokio::time::timeout(Duration::from_secs(10), p.wait_ready(id))
        .await
        .unwrap_or_else(|_| panic!("worker {id} did not become ready: {:?}", p.workers()))
        .expect("the worker loads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_load_serve_queue_and_drain() {
    let p = pool(1000, 1);
    let a = p.add_worker("test").unwrap();
    let b = p.add_worker("test").unwrap();
    assert_ne!(a, b);
    // A third does not fit the 1000-byte budget (500 each), and says so.
    let e = p.add_worker("test").unwrap_err();
    assert_eq!(e.need, 500);
    assert!(p.events().iter().any(|e| e.message.contains("not started")));
    wait_ready(&p, a).await;
    wait_ready(&p, b).await;
    // Each worker reserved 500; an engine that reports what its context allocated (llama.cpp)
    // has that figure in place of the estimate's KV and overhead now.
    assert_eq!(p.memory(), (1000, reserved_by_workers(&p)));
    if test_engine() == EngineKind::MistralRs {
        assert_eq!(p.memory().1, 1000);
    }

    // One slot each: two leases land on different workers.
    let l1 = p
        .acquire(Class::Standard, Duration::from_secs(5))
        .await
        .unwrap();
    let l2 = p
        .acquire(Class::Standard, Duration::from_secs(5))
        .await
        .unwrap();
    assert_ne!(l1.worker(), l2.worker());

    // A lease really generates.
    let mut req = GenerationRequest::chat(vec![ChatMessage::new(Role::User, "hi")]);
    req.sampling.max_tokens = Some(4);
    let mut stream = l1.engine().generate(req).await.unwrap();
    let mut done = false;
    while let Some(ev) = stream.next().await {
        done |= matches!(ev, GenerationEvent::Done { .. });
    }
    assert!(done);

    // Full: the next waits and its deadline expires cleanly.
    let err = p
        .acquire(Class::Standard, Duration::from_millis(100))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, AcquireError::DeadlineExceeded(_)), "{err}");
    // One waiter fits the queue; a second is refused with a retry hint.
    let p2 = p.clone();
    let waiter = tokio::spawn(async move {
        p2.acquire(Class::Interactive, Duration::from_secs(10))
            .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(p.queue_depth(Class::Interactive), 1);
    let err = p
        .acquire(Class::Batch, Duration::from_secs(1))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, AcquireError::QueueFull(_)), "{err}");
    // Freeing a slot hands it to the waiter.
    let freed = l1.worker();
    drop(l1);
    let l3 = waiter.await.unwrap().unwrap();
    assert_eq!(l3.worker(), freed);

    // Draining a busy worker keeps it until its lease ends, then stops it and frees its memory.
    let drained = p.drain_worker("test").unwrap();
    let held = if l2.worker() == drained { l2 } else { l3 };
    assert!(p
        .workers()
        .iter()
        .any(|w| w.id == drained && w.state == WorkerState::Draining));
    assert_eq!(p.active_workers(), 1);
    drop(held);
    assert!(p.workers().iter().all(|w| w.id != drained));
    assert_eq!(p.memory().1, reserved_by_workers(&p));
    assert!(p.memory().1 >= RESERVATION.weights);
    assert!(p
        .events()
        .iter()
        .any(|e| e.worker == Some(drained) && e.to == Some(WorkerState::Stopped)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_goes_away_leaves_the_queue() {
    let p = pool(500, 4);
    let id = p.add_worker("test").unwrap();
    wait_ready(&p, id).await;
    let held = p
        .acquire(Class::Standard, Duration::from_secs(5))
        .await
        .unwrap();
    let p2 = p.clone();
    let waiter = tokio::spawn(async move {
        p2.acquire(Class::Standard, Duration::from_secs(30))
            .await
            .is_ok()
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(p.queue_depth(Class::Standard), 1);
    waiter.abort();
    let _ = waiter.await;
    assert_eq!(p.queue_depth(Class::Standard), 0);
    drop(held);
    // The slot is free for the next request at once.
    let l = tokio::time::timeout(
        Duration::from_secs(1),
        p.acquire(Class::Standard, Duration::from_secs(1)),
    )
    .await;
    assert!(l.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_fails_to_load_says_why_and_frees_its_reservation() {
    let junk = tidepool_tests::fixture_dir().join("not-a-model.gguf");
    std::fs::write(&junk, b"this is not a GGUF file").unwrap();
    let factory = worker_factory(
        local_file(&junk).unwrap(),
        EngineConfig {
            device: DevicePreference::Cpu,
            max_sequences: 1,
            prefix_cache_entries: 0,
            pooling: None,
        },
        RESERVATION,
    );
    let p = Pool::new(factory, 1000, 1);
    let id = p.add_worker("test").unwrap();
    let why = tokio::time::timeout(Duration::from_secs(10), p.wait_ready(id))
        .await
        .expect("wait_ready returns")
        .unwrap_err();
    assert!(why.contains("load failed"), "{why}");
    assert_eq!(p.memory().1, 0);
    assert!(p.workers().is_empty());
}
