//! Memory as the ledger counts it is what the process holds (on the test engine, `small`
//! fixture): a second worker adds its own weights on mistral.rs and gives them back when drained,
//! but on llama.cpp it shares the first one's and adds only its KV cache and buffers; draining
//! the last worker (scale to zero) gives the weights back, and the next worker loads them again.
//! Its own test binary (one test), so no other test's allocations move this process's RSS
//! meanwhile.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tidepool_engine::choice::EngineKind;
use tidepool_engine::request::{ChatMessage, GenerationEvent, GenerationRequest, Role};
use tidepool_engine::{DevicePreference, EngineConfig};
use tidepool_models::gguf_info::GgufInfo;
use tidepool_models::model_source::local_file;
use tidepool_sched::ledger::{self, WorkerShape};
use tidepool_sched::memory::process_rss_bytes;
use tidepool_sched::pool::Pool;
use tidepool_sched::queue::Class;
use tidepool_tests::{named_fixture, test_engine, worker_factory, TEST_CONTEXT_TOKENS};

const MIB: f64 = 1024.0 * 1024.0;

/// Generates a few tokens on whichever worker the pool hands out.
async fn serve_one(p: &Arc<Pool>) {
    let lease = p
        .acquire(Class::Standard, Duration::from_secs(10))
        .await
        .expect("a slot");
    // A long prompt fills a whole prefill batch, so the worker's buffers are all in use.
    let prompt = "hello there, how are you today? ".repeat(80);
    let mut req = GenerationRequest::chat(vec![ChatMessage::new(Role::User, prompt)]);
    req.sampling.max_tokens = Some(8);
    let mut events = lease.engine().generate(req).await.expect("generate");
    while let Some(e) = events.next().await {
        if matches!(e, GenerationEvent::Done { .. } | GenerationEvent::Error(_)) {
            break;
        }
    }
}

/// Waits (up to 20 s) until RSS is at least `by` below `from`; returns the RSS seen last.
async fn rss_falls(from: u64, by: u64, stopped: impl Fn() -> bool) -> u64 {
    let started = Instant::now();
    let mut after = process_rss_bytes();
    while started.elapsed() < Duration::from_secs(20) {
        after = process_rss_bytes();
        if stopped() && from.saturating_sub(after) >= by {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    after
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_memory_goes_back_to_the_os_and_shared_weights_count_once() {
    let model = local_file(&named_fixture("small")).unwrap();
    let info = GgufInfo::read(&model.files).unwrap();
    // Each engine's own reservation: mistral.rs holds the embedding table dense on the CPU and
    // loads the weights per worker; llama.cpp maps the quantized weights once for all workers.
    let reservation = ledger::reservation(
        &info,
        &WorkerShape {
            slots: 1,
            context_tokens: TEST_CONTEXT_TOKENS as u64,
            kv_elem_bytes: 2,
            activation_bytes: 4,
            overhead: 0,
        },
        test_engine(),
    );
    let shares = reservation.shared_weights.is_some();
    assert_eq!(shares, test_engine() == EngineKind::LlamaCpp);
    let factory = worker_factory(
        model,
        EngineConfig {
            device: DevicePreference::Cpu,
            max_sequences: 1,
            prefix_cache_entries: 0,
            pooling: None,
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
    let gone = |id: u64| {
        let p = p.clone();
        move || p.workers().iter().all(|w| w.id != id)
    };
    let half_weights = reservation.weights / 2;

    let before = process_rss_bytes();
    let first = p.add_worker("test").unwrap();
    wait_ready(first).await;
    serve_one(&p).await;
    let one = process_rss_bytes();
    let (_, reserved_one) = p.memory();

    let second = p.add_worker("test").unwrap();
    wait_ready(second).await;
    // Both workers busy at once, so the second one really runs.
    tokio::join!(serve_one(&p), serve_one(&p));
    let two = process_rss_bytes();
    let grew = two.saturating_sub(one);
    let (_, reserved_two) = p.memory();

    assert_eq!(p.drain_worker("test"), Some(second));
    // Without shared weights the second worker's own copy goes back.
    let after = rss_falls(two, if shares { 0 } else { half_weights }, gone(second)).await;
    let fell = two.saturating_sub(after);
    println!(
        "reserved per worker {:.1} MiB (weights {:.1}{}, KV {:.1}); two workers reserve {:.1} MiB. \
         RSS before {:.1} MiB, one worker {:.1}, two {:.1} (+{:.1}), after draining one {:.1} (-{:.1})",
        reservation.total() as f64 / MIB,
        reservation.weights as f64 / MIB,
        if shares { ", shared" } else { "" },
        reservation.kv_cache as f64 / MIB,
        reserved_two as f64 / MIB,
        before as f64 / MIB,
        one as f64 / MIB,
        two as f64 / MIB,
        grew as f64 / MIB,
        after as f64 / MIB,
        fell as f64 / MIB,
    );
    if shares {
        // The second worker's reservation is what its context allocated (the engine says).
        let own = reserved_two - reserved_one;
        println!(
            "the second worker reserves {:.1} MiB of its own; RSS grew {:.1} MiB ({:.0} %)",
            own as f64 / MIB,
            grew as f64 / MIB,
            100.0 * grew as f64 / own.max(1) as f64
        );
        // Both workers' contexts are alike: the weights count once, each context on top.
        assert_eq!(
            reserved_two,
            reservation.weights + 2 * own,
            "the second worker reserved weights again"
        );
        // A small context's figure is near the noise of a test process (allocator arenas of new
        // threads); scripts/bench-scaleup.sh measures the real models' ratio.
        let ratio = grew as f64 / own as f64;
        assert!(
            (0.5..2.0).contains(&ratio),
            "the second worker's RSS growth is {:.0} % of what it reserved",
            100.0 * ratio
        );
        assert!(
            grew < own + half_weights,
            "a second worker on shared weights grew RSS by {grew} bytes: its own {own} and most \
             of the weights ({}) again",
            reservation.weights
        );
    } else {
        assert_eq!(reserved_two, 2 * reservation.total());
        assert!(
            grew >= half_weights,
            "a second worker should add at least half its weights to RSS: +{grew} bytes, weights {}",
            reservation.weights
        );
        assert!(
            fell >= half_weights,
            "RSS fell by {fell} bytes after the drain; want at least half the weights, {half_weights}"
        );
    }
    // The first worker still serves.
    serve_one(&p).await;

    // Scale to zero: the last worker takes the weights with it, and the next one loads them.
    let serving = process_rss_bytes();
    assert_eq!(p.drain_worker("test"), Some(first));
    let zero = rss_falls(serving, half_weights, gone(first)).await;
    println!(
        "scaled to zero: RSS {:.1} MiB (-{:.1}), reserved {:.1} MiB",
        zero as f64 / MIB,
        serving.saturating_sub(zero) as f64 / MIB,
        p.memory().1 as f64 / MIB
    );
    assert_eq!(p.memory().1, 0, "nothing stays reserved at zero workers");
    assert!(
        serving.saturating_sub(zero) >= half_weights,
        "RSS fell by {} bytes at zero workers; want at least half the weights, {half_weights}",
        serving.saturating_sub(zero)
    );
    let again = p.add_worker("test").unwrap();
    wait_ready(again).await;
    serve_one(&p).await;
    p.stop();
}
