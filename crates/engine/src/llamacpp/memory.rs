//! What a new `llama_context` allocates (KV cache, compute and output buffers), read from the
//! sizes llama.cpp logs while it creates one. The log callback runs on the creating thread, so a
//! thread-local tally catches exactly that context's lines.

use std::cell::RefCell;

use crate::OwnMemory;

thread_local! {
    static TALLY: RefCell<Option<OwnMemory>> = const { RefCell::new(None) };
}

/// Runs `create` (which creates one context on this thread) and returns what it allocated.
pub(super) fn measure<T>(create: impl FnOnce() -> T) -> (T, OwnMemory) {
    TALLY.with(|t| *t.borrow_mut() = Some(OwnMemory::default()));
    let out = create();
    let memory = TALLY.with(|t| t.borrow_mut().take()).unwrap_or_default();
    (out, memory)
}

/// Counts one llama.cpp log line, if a measurement runs on this thread and the line names a
/// buffer's size.
pub(super) fn note(line: &str) {
    TALLY.with(|t| {
        if let Some(m) = t.borrow_mut().as_mut() {
            match parse(line) {
                Some((Kind::Kv, b)) => m.kv_cache += b,
                Some((Kind::Buffer, b)) => m.buffers += b,
                None => {}
            }
        }
    });
}

#[derive(Debug, PartialEq)]
enum Kind {
    Kv,
    Buffer,
}

/// `llama_kv_cache:        CPU KV buffer size =     8.00 MiB`,
/// `llama_context:        CPU  output buffer size =     0.12 MiB`,
/// `sched_reserve:        CPU compute buffer size =     5.13 MiB`.
fn parse(line: &str) -> Option<(Kind, u64)> {
    let kind = if line.contains(" KV buffer size = ") {
        Kind::Kv
    } else if line.contains(" output buffer size = ") || line.contains(" compute buffer size = ") {
        Kind::Buffer
    } else {
        return None;
    };
    let (_, rest) = line.split_once(" size = ")?;
    let mib: f64 = rest.trim().strip_suffix("MiB")?.trim().parse().ok()?;
    Some((kind, (mib * 1024.0 * 1024.0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_sizes_llama_cpp_logs() {
        let mib = 1024 * 1024;
        assert_eq!(
            parse("llama_kv_cache:        CPU KV buffer size =     8.00 MiB"),
            Some((Kind::Kv, 8 * mib))
        );
        assert_eq!(
            parse("sched_reserve:        CPU compute buffer size =     5.50 MiB"),
            Some((Kind::Buffer, 5 * mib + mib / 2))
        );
        assert_eq!(
            parse("llama_context:        CPU  output buffer size =     0.25 MiB"),
            Some((Kind::Buffer, mib / 4))
        );
        // The KV summary line repeats the buffer's size: not counted twice.
        assert_eq!(
            parse("llama_kv_cache: size =    8.00 MiB (  4096 cells,   4 layers,  1/1 seqs)"),
            None
        );
    }
}
