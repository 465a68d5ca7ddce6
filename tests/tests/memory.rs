//! Memory really goes back to the OS when a worker stops (on the test engine): a second worker on the `small` fixture
//! loads, serves, drains, and process RSS falls by at least half of its weight bytes. Its own
//! test binary (one test), so no other test's allocations move this process's RSS meanwhile.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tidepool_engine::request::{ChatMessage, GenerationEvent, GenerationRequest, Role};
use tidepool_engine::{DevicePreference, EngineConfig};
use tidepool_models::gguf_info::GgufInfo;
use tidepool_models::model_source::local_file;
use tidepool_sched::ledger::{self, WorkerShape};
use tidepool_sched::memory::process_rss_bytes;
use tidepool_sched::pool::{Pool, WorkerState};
use tidepool_sched::queue::Class;
use tidepool_tests::{named_fixture, test_engine, worker_factory};

const MIB: f64 = 1024.0 * 1024.0;

/// Generates a few tokens on whichever worker the pool hands out.
async fn serve_one(p: &Arc<Pool>) {
    let lease = p
        .acquire(Class::Standard, Duration::from_secs(10))
        .await
        .expect("a slot");
    let mut req = GenerationRequest::chat(vec![ChatMessage::new(Role::User, "hello there")]);
    req.sampling.max_tokens = Some(8);
    let mut events = lease.engine().generate(req).await.expect("generate");
    while let Some(e) = events.next().await {
        if matches!(e, GenerationEvent::Done { .. } | GenerationEvent::Error(_)) {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_worker_gives_its_memory_back_to_the_os() {
    let model = local_file(&named_fixture("small")).unwrap();
    let info = GgufInfo::read(&model.files).unwrap();
    // Each engine's own reservation: mistral.rs holds the embedding table dense on the CPU,
    // llama.cpp maps the quantized weights as they are.
    let reservation = ledger::reservation(
        &info,
        &WorkerShape {
            slots: 1,
            context_tokens: 512,
            kv_elem_bytes: 2,
            activation_bytes: 4,
            overhead: 0,
        },
        test_engine(),
    );
    let factory = worker_factory(
        model,
        EngineConfig {
            device: DevicePreference::Cpu,
            max_sequences: 1,
            prefix_cache_entries: 0,
        },
        reservation,
    );
    let p = Pool::new(factory, u64::MAX, 8);
    let wait_ready = |id| {
        let p = p.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(60), p.wait_ready(id))
                .await
                .expect("the worker loads in time")
                .expect("the worker loads");
        }
    };

    let first = p.add_worker("test").unwrap();
    wait_ready(first).await;
    serve_one(&p).await;
    let one = process_rss_bytes();

    let second = p.add_worker("test").unwrap();
    wait_ready(second).await;
    // Both workers busy at once, so the second one really runs.
    tokio::join!(serve_one(&p), serve_one(&p));
    let two = process_rss_bytes();
    let grew = two.saturating_sub(one);

    assert_eq!(p.drain_worker("test"), Some(second));
    let started = Instant::now();
    let mut after = process_rss_bytes();
    let wanted = reservation.weights / 2;
    while started.elapsed() < Duration::from_secs(20) {
        let stopped = p
            .workers()
            .iter()
            .all(|w| w.id != second || w.state == WorkerState::Stopped);
        after = process_rss_bytes();
        if stopped && two.saturating_sub(after) >= wanted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fell = two.saturating_sub(after);
    println!(
        "reserved per worker {:.1} MiB (weights {:.1}, KV {:.1}); RSS one worker {:.1} MiB, two {:.1} \
         (+{:.1}), after the drain {:.1} (-{:.1})",
        reservation.total() as f64 / MIB,
        reservation.weights as f64 / MIB,
        reservation.kv_cache as f64 / MIB,
        one as f64 / MIB,
        two as f64 / MIB,
        grew as f64 / MIB,
        after as f64 / MIB,
        fell as f64 / MIB,
    );
    assert!(
        grew >= wanted,
        "a second worker should add at least half its weights to RSS: +{grew} bytes, weights {}",
        reservation.weights
    );
    assert!(
        fell >= wanted,
        "RSS fell by {fell} bytes after the drain; want at least half the weights, {wanted}"
    );
    // The first worker still serves.
    serve_one(&p).await;
    p.stop();
}
