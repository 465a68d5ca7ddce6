//! Any bytes as a GGUF file: the header check must return (a summary or an error), never
//! panic, never allocate what the bytes claim.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tidepool_gguf::check(data, data.len() as u64);
});
