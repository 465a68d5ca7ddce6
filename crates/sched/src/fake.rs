//! A [`WorkerFactory`] of [`FakeEngine`]s, for the tests of the pool and of what is built on it
//! (the scheduler here, the gateway above), which need workers but no inference library. It
//! keeps every engine it made, in order, so a test can kill one, gate it or read what it
//! served, and the context each worker was loaded with.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use tidepool_engine::fake::FakeEngine;
use tidepool_engine::{Engine, EngineError};

use crate::ledger::Reservation;
use crate::pool::WorkerFactory;

/// Workers that are fake engines of `slots` sequences answering `tokens` tokens, each reserving
/// one byte of weights (so a budget of `n` holds `n` of them).
pub struct FakeWorkers {
    slots: usize,
    tokens: u32,
    engines: Mutex<Vec<Arc<FakeEngine>>>,
    contexts: Mutex<Vec<u32>>,
    born_dying: AtomicBool,
}

impl FakeWorkers {
    pub fn new(slots: usize, tokens: u32) -> Arc<FakeWorkers> {
        Arc::new(FakeWorkers {
            slots,
            tokens,
            engines: Mutex::new(Vec::new()),
            contexts: Mutex::new(Vec::new()),
            born_dying: AtomicBool::new(false),
        })
    }

    /// The engines made so far, oldest first.
    pub fn engines(&self) -> Vec<Arc<FakeEngine>> {
        lock(&self.engines).clone()
    }

    /// The `i`th engine made (0 is the first).
    pub fn engine(&self, i: usize) -> Arc<FakeEngine> {
        lock(&self.engines)[i].clone()
    }

    /// The context each worker was loaded with, in the order they were made.
    pub fn contexts(&self) -> Vec<u32> {
        lock(&self.contexts).clone()
    }

    /// From now on every new engine dies as its first request reaches it.
    pub fn make_engines_that_die_at_their_first_request(&self) {
        self.born_dying.store(true, Ordering::SeqCst);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl WorkerFactory for FakeWorkers {
    fn reservation(&self, _context: u32) -> Reservation {
        Reservation {
            weights: 1,
            kv_cache: 0,
            overhead: 0,
            shared_weights: None,
        }
    }

    fn slots(&self) -> usize {
        self.slots
    }

    fn max_context(&self) -> u32 {
        4096
    }

    fn load(&self, context: u32) -> BoxFuture<'static, Result<Arc<dyn Engine>, EngineError>> {
        let engine = Arc::new(FakeEngine::new(self.slots, self.tokens));
        if self.born_dying.load(Ordering::SeqCst) {
            engine.dies_at_next_request();
        }
        lock(&self.engines).push(engine.clone());
        lock(&self.contexts).push(context);
        Box::pin(async move { Ok(engine as Arc<dyn Engine>) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_engine::request::Prompt;

    #[tokio::test]
    async fn keeps_each_engine_and_the_context_it_was_loaded_with() {
        let workers = FakeWorkers::new(2, 3);
        let first = workers.load(512).await.unwrap();
        workers.make_engines_that_die_at_their_first_request();
        let second = workers.load(1024).await.unwrap();
        assert_eq!(workers.contexts(), vec![512, 1024]);
        assert_eq!(workers.engines().len(), 2);
        assert_eq!(first.info().max_sequences, 2);

        let hello = Prompt::Text("hello".into());
        assert!(first.count_tokens(&hello, &[]).await.is_ok());
        assert!(matches!(
            second.count_tokens(&hello, &[]).await,
            Err(EngineError::Unavailable(_))
        ));
    }
}
